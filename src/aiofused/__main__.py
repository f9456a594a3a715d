"""``python -m aiofused``: the same as the ``aiofused`` command."""

import sys

from aiofused.cli import main

sys.exit(main())
