"""What crosses a process boundary: checkpoints, model specs, config files, reports, and the atomic output files
they are written through."""
