"""What `inspect` and `verify` compute: per-layer facts of a checkpoint, and agreement with the reference."""
