"""In-tree aiofused driver plugins (installed as ``aiofused_drivers``)."""

# Importing aiofused first runs its twin selection (aiofused._twin.select) before any
# compiled driver module can load: a compiled driver imported first would load beside a
# pure core, and its native type checks would then refuse the pure core's records.
import aiofused  # noqa: F401
