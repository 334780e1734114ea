"""What the services share, and the only thing they share.

- ``messages``: every message on the wire (Problem, Sample, RawGroup, ScoredGroup, the
  trainer's control state, the run record, dead letters), pydantic v2, versioned, invariants enforced.
- ``run``: the run record (the run's shape and format, checked by every service at start)
  and the trainer's control state, each written and read through one helper.
- ``keys``: every Redis stream and key name, under one configurable prefix, and the one
  helper that deletes every key under a prefix.
- ``streams``: publish to capped streams; read through consumer groups with leases,
  reclaim of a dead consumer's work, and dead-lettering.
- ``worker``: the consume-handle-commit loop, exactly once in effect (idempotent by key),
  with graceful stop on SIGTERM.
- ``config``: one YAML file with a section per service, environment overrides, errors
  that name the file, section and field; ``settings_cli``: every setting as a flag, and
  docs/configuration.md.
- ``logs``: structured logging and the start-up config line.
- ``redis_server``: find a Redis, or start a private one (tests, ``pope up``).
- ``engine_client``, ``verifier_client``, ``retry``: the one engine client, the client of
  the verifier's ``POST /v1/verify``, and their one retry loop.
- ``http``, ``rng``, ``malloc``: health, metrics, auth and serving; Python RNG state as
  JSON; glibc's malloc kept from returning freed memory.

Message flow (DESIGN.md 2, 4):

    rollout --RawGroup--> pope:rollouts --[verifiers]--> verifier
    verifier --ScoredGroup--> pope:scored --[trainers]--> trainer
    trainer --TrainerControl--> pope:state:trainer (its version), new weights --> engine
    failures --> pope:dead
"""
