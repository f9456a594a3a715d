"""ublk-style block device driver with zero-copy targets, served over NBD.

* :class:`UblkDriver` (entry point ``ublk``): queues, tags, request buffers and the
  ublk commands FETCH_REQ / COMMIT_AND_FETCH_REQ / FUSED_SUBMIT_IO, and with
  ``batch_io`` (UBLK_F_BATCH_IO) FETCH_IO_CMDS / COMMIT_IO_CMDS for many tags at once.
* Targets (:func:`make_target`): ``null``, ``loop``, ``mirror``, ``linear``; the data
  path of each is a fused command on the request's own buffer.
* :class:`UblkServer` runs a target against a device on a ring;
  :class:`NbdServer` feeds devices from NBD clients; :class:`BlockService` wires it all
  (what ``aiofused nbd serve`` runs).
"""

from ._device import (
    UBLK_IO_COMMIT_AND_FETCH_REQ,
    UBLK_IO_COMMIT_IO_CMDS,
    UBLK_IO_FETCH_IO_CMDS,
    UBLK_IO_FETCH_REQ,
    UBLK_IO_FUSED_SUBMIT_IO,
    UBLK_IO_RES_ABORT,
    UBLK_IO_RES_OK,
    BlockRequest,
    IoDesc,
    IoOp,
    UblkDriver,
    pack_batch_cmd,
    pack_io_cmd,
)
from ._mapping import MappingStore, SqliteMappingStore
from ._nbd import Export, NbdServer, export_from_spec
from ._reqbuf import RequestBuffers
from ._server import Ctx, Piece, RingHost, UblkServer
from ._service import BlockService, ExportSpec, parse_export
from ._targets import (
    LinearTarget,
    LoopTarget,
    MirrorTarget,
    NullTarget,
    Target,
    make_target,
    parse_size,
)

__all__ = [
    "UBLK_IO_COMMIT_AND_FETCH_REQ",
    "UBLK_IO_COMMIT_IO_CMDS",
    "UBLK_IO_FETCH_IO_CMDS",
    "UBLK_IO_FETCH_REQ",
    "UBLK_IO_FUSED_SUBMIT_IO",
    "UBLK_IO_RES_ABORT",
    "UBLK_IO_RES_OK",
    "BlockRequest",
    "BlockService",
    "Ctx",
    "Export",
    "ExportSpec",
    "IoDesc",
    "IoOp",
    "LinearTarget",
    "LoopTarget",
    "MappingStore",
    "MirrorTarget",
    "NbdServer",
    "NullTarget",
    "Piece",
    "RequestBuffers",
    "RingHost",
    "SqliteMappingStore",
    "Target",
    "UblkDriver",
    "UblkServer",
    "export_from_spec",
    "make_target",
    "pack_batch_cmd",
    "pack_io_cmd",
    "parse_export",
    "parse_size",
]
