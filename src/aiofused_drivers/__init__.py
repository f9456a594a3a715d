"""In-tree aiofused driver plugins (installed as ``aiofused_drivers``)."""
