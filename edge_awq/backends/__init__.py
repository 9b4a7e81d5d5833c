"""Compute backends behind ``edge_awq.ops.Backend``."""
