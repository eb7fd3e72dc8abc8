"""Checkpoint save/load (dist_checkpointing), atomic commit and `latest`."""
