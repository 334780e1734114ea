"""POPE-RL: Privileged On-Policy Exploration as services over Redis.

One sub-package per role: ``common`` (messages, streams, config: the only code the
services share), ``engine``, ``rollout``, ``verifier``, ``trainer``. Services import
``common`` and never each other; ``cli`` is the ``pope`` command that starts them.
"""
