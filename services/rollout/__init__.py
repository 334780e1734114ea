"""The rollout service: problems, hints, the user-facing HTTP API, and the scheduler that
samples hinted and unhinted groups from the engine into ``pope:rollouts``; the hint search
and pass@k evaluation run through the same engine and the verifier."""
