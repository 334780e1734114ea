"""The rollout service: problems, hints, the user-facing HTTP API, and the scheduler that
samples hinted and unhinted groups from the engine into ``pope:rollouts``. Not built yet."""
