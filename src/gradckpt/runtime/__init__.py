"""Code that runs inside forward and backward: checkpoint, decision wrappers, segments, selective, offload."""
