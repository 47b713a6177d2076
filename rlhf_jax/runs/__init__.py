"""A training run's life cycle, shared by every trainer: config validation before compute,
the run record (config.json, config_history.jsonl, resume checks), the non-finite step guard,
and the loop plumbing that ties checkpoints, metrics and stop signals together."""
