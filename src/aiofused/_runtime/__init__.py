"""The runtime: the public ``Ring`` (loop, timers, backends, drivers) and the lease."""
