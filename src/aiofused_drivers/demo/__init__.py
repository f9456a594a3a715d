"""``aiofused demo``: what fused commands buy, shown on this machine.

* :mod:`.fanout`: the 1:N fan-out comparison (one fused command vs an ``IO_LINK``
  chain vs ``asyncio.gather``), also run by ``benchmarks/fanout.py``;
* :mod:`.showcase`: a mirrored transfer through the zero-copy proxy
  (:mod:`aiofused_drivers.relay.proxy`), verified byte for byte.
"""
