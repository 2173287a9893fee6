"""hastore: two-node storage failover."""
__version__ = "0.1.0"
