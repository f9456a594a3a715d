"""The pure ring core: no asyncio, os or ctypes (a test imports it with them poisoned).

``records`` (request records and both lifecycle tables), ``opdef`` (the op table),
``sqe`` (Sqe, Cqe and the prep helpers), ``fused`` (the fused lifecycle), ``ring``
(RingCore: SQ/CQ, the link/drain/skip scheduler, timeouts) and ``port`` (the effects
the core asks its runtime for).
"""
