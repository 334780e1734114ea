"""The run's forms and its seeded fault schedule (pure: no processes, no clock).

    faults = schedule(LONG, seed=3, lease_s=3.0)   # the same list for the same seed
    [f.kind for f in faults]                       # "kill9-redis", "sigstop-trainer", ...

A fault is a ``kill -9`` of one service (restarted after ``hold_s``) or a ``SIGSTOP`` of
one (resumed after ``hold_s``, always longer than the lease, so what it holds is reclaimed
or expires while it is stopped). The order, the targets (which verifier replica, which
service is stopped) and every delay come from ``random.Random(seed)``. Faults are spread
over the run by step: fault i waits for the trainer's step ``at_step`` (evenly spaced over
the first ``FAULT_SPAN`` of the steps, so the last fault leaves steps to recover in), and
for a step since the previous fault (the stack makes progress between faults), then its
seeded pause. Pacing by step, not time, keeps the faults inside the run on a fast machine
(the trainer would otherwise finish its steps with faults still to come) and lets a slow
one take longer rather than crowd them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Action = Literal["kill9", "sigstop"]

KILLED = ("engine", "verifier", "trainer", "rollout", "redis")
"""Services the run kills with SIGKILL and restarts (Redis from its AOF, on the same port)."""
STOPPED = ("engine", "verifier", "trainer", "rollout")
"""Services the run freezes with SIGSTOP past the lease and resumes with SIGCONT."""
VERIFIER_REPLICAS = 2
FAULT_SPAN = 0.85
"""The share of a form's steps its faults are spread over."""


@dataclass(frozen=True)
class Form:
    """How big a chaos run is: the steps it trains and the faults it injects."""

    name: str
    steps: int
    """The trainer's max_steps: the run ends when the trainer has taken this many steps."""
    kills_each: int
    """kill -9 faults per service in KILLED."""
    stops: int
    """SIGSTOP faults in all, their targets cycling through STOPPED in a seeded order."""
    gap_s: tuple[float, float]
    """Pause, drawn from this range, once the trainer has stepped since the previous fault."""
    restart_after_s: tuple[float, float]
    """How long a killed service stays down."""
    stop_past_lease_s: tuple[float, float]
    """How much longer than the lease a SIGSTOP lasts."""
    deadline_s: float
    """The run's wall-time budget, to the trainer's last step; past it the run fails, naming
    what the stack is waiting for."""
    progress_within_s: float
    """After a fault, the trainer must take a step within this long (else the stack is stuck:
    a finding)."""

    @property
    def faults(self) -> int:
        return self.kills_each * len(KILLED) + self.stops

    def __post_init__(self) -> None:
        if self.steps * FAULT_SPAN <= self.faults:  # a step between faults, and steps after the last
            raise ValueError(
                f"form {self.name}: {self.faults} faults need more than {self.faults / FAULT_SPAN:.0f} steps, "
                f"not {self.steps}"
            )


SHORT = Form(
    "short",
    steps=30,
    kills_each=1,
    stops=1,
    gap_s=(0.0, 1.0),
    restart_after_s=(0.5, 1.5),
    stop_past_lease_s=(1.0, 2.0),
    deadline_s=170.0,
    progress_within_s=60.0,
)
LONG = Form(
    "long",
    steps=800,
    kills_each=8,
    stops=16,
    gap_s=(0.0, 3.0),
    restart_after_s=(0.5, 4.0),
    stop_past_lease_s=(1.0, 4.0),
    deadline_s=1800.0,
    progress_within_s=180.0,
)
FORMS = {f.name: f for f in (SHORT, LONG)}


@dataclass(frozen=True)
class Fault:
    """One planned fault. ``replica`` picks the verifier (0 for the other services)."""

    index: int
    action: Action
    service: str
    replica: int
    gap_s: float
    """Pause after the trainer's first step since the previous fault: faults land anywhere in a step."""
    hold_s: float
    """Down time after a kill; stopped time of a SIGSTOP (lease + margin)."""
    at_step: int = 0
    """The trainer step the fault waits for (spread evenly over the run)."""
    engines: int = 1
    """Engines in the run: above 1 an engine fault hits one of them (``replica``)."""

    @property
    def kind(self) -> str:
        return f"{self.action}-{self.service}"

    @property
    def target(self) -> str:
        """The process's name in the run: ``verifier-0``, ``trainer``, ``redis``; with
        several engines ``engine-1``."""
        named = self.service == "verifier" or (self.service == "engine" and self.engines > 1)
        return f"{self.service}-{self.replica}" if named else self.service


def schedule(form: Form, seed: int, lease_s: float, engines: int = 1) -> list[Fault]:
    """The faults of ``form`` in a seeded order, with seeded targets and delays; with
    ``engines`` > 1 each engine fault hits a seeded one of them (one engine: the same
    schedule as ever for a seed)."""
    rng = random.Random(seed)
    stop_order = list(STOPPED)
    rng.shuffle(stop_order)
    planned: list[tuple[Action, str]] = [("kill9", s) for s in KILLED for _ in range(form.kills_each)]
    planned += [("sigstop", stop_order[i % len(stop_order)]) for i in range(form.stops)]
    rng.shuffle(planned)
    faults = []
    for index, (action, service) in enumerate(planned):
        replica = rng.randrange(VERIFIER_REPLICAS) if service == "verifier" else 0
        gap = round(rng.uniform(*form.gap_s), 2)
        hold = (
            rng.uniform(*form.restart_after_s) if action == "kill9" else lease_s + rng.uniform(*form.stop_past_lease_s)
        )
        at = int((index + 1) * form.steps * FAULT_SPAN / (len(planned) + 1))
        if service == "engine" and engines > 1:
            replica = rng.randrange(engines)
        faults.append(Fault(index, action, service, replica, gap, round(hold, 2), at, engines))
    return faults
