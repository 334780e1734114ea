"""The trainer service: GRPO updates on ScoredGroups, checkpoints, and weight pushes to the
engine (``/update_weights_from_disk``, through a weight sink: ``sink``)."""
