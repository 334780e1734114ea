"""When ``pope up`` starts a dead service again, and when it gives up (services/stack.py).

    policy = RestartPolicy()                        # 1 s doubling to 30 s; 5 deaths in 120 s: stop
    deaths = Deaths(policy)
    delay = deaths.record(now, ran_s, random())     # None: a crash loop

As compose's ``restart: unless-stopped`` with Kubernetes' CrashLoopBackOff: each death of
a child waits out a backoff that doubles, with jitter, up to a ceiling; a child that ran a
while before it died starts the backoff over; too many deaths in a short window are a crash
loop, which no restart mends (a bad config, a port taken), so the stack stops. Pure: the
caller gives the clock and the random draw.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """When to start a dead child again, and when to give up on it."""

    first_delay_s: float = 1.0
    """Backoff before the first restart; it doubles with each death after that."""
    max_delay_s: float = 30.0
    """The backoff's ceiling."""
    jitter: float = 0.2
    """Each delay is drawn within +-this fraction of it, so children that died together
    (a Redis or engine outage) do not all come back in the same instant."""
    reset_after_s: float = 60.0
    """A child that ran this long before it died was healthy: its backoff starts over."""
    crash_loop_deaths: int = 5
    """This many deaths of one child within ``crash_loop_window_s`` stop the stack."""
    crash_loop_window_s: float = 120.0

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds before restart ``attempt`` (1 = the first since the child was last
        healthy); ``rand`` in [0, 1) places it within the jitter."""
        base = min(self.max_delay_s, self.first_delay_s * 2.0 ** (attempt - 1))
        return base * (1 + self.jitter * (2 * rand - 1))


class Deaths:
    """One child's deaths under a policy: the backoff attempt and the crash-loop window.
    Pure (the caller gives the clock), so the schedule is tested without processes."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.attempt = 0  # deaths since the child was last healthy
        self.recent: deque[float] = deque()  # times of the deaths within the window

    def record(self, at: float, ran_s: float, rand: float) -> float | None:
        """A death at ``at`` (monotonic seconds), after running ``ran_s``: the delay before
        the restart, or None when this death makes a crash loop."""
        p = self.policy
        self.attempt = 1 if ran_s >= p.reset_after_s else self.attempt + 1
        self.recent.append(at)
        while self.recent[0] <= at - p.crash_loop_window_s:
            self.recent.popleft()
        if len(self.recent) >= p.crash_loop_deaths:
            return None
        return p.delay(self.attempt, rand)


def exit_text(returncode: int | None) -> str:
    """How a process ended, for people: ``exit status 1``, ``killed by SIGKILL``."""
    if returncode is None or returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
