"""Block pruning: calibration scores (`importance`), the plan file, removal at load and per-call skipping (`plan`)."""
