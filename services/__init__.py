"""POPE-RL: Privileged On-Policy Exploration as services over Redis.

One sub-package per role: ``common`` (messages, streams, config: the only code the
services share), ``engine``, ``rollout``, ``verifier``, ``trainer``. Services import
``common`` and never each other; ``cli`` is the ``pope`` command that starts them,
``stack`` the one launcher of child services, ``up`` the one-machine stack, ``offline`` the
hint search and evaluation jobs. The experiments live apart, in the ``experiments``
package.
"""
