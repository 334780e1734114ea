"""Child processes that die with their parent, even when the parent is killed outright.

    subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent())

A child in a session of its own misses the terminal's Ctrl-C (its parent stops it, in
order) but also misses the hang-up when the parent dies: after a ``kill -9`` of the parent
it would go on running, an engine decoding at full CPU with nobody to answer. On Linux the
child asks the kernel for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``). The kernel
ties that to the parent *thread* that forked, so start children from a thread that lives as
long as they should (``pope up`` starts and restarts them all from its main thread).
Elsewhere there is no such call: ``die_with_parent`` returns None and a child outlives a
parent killed outright (a clean stop still stops it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies, or
    None where that is not possible (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # in the child, between fork and exec: no imports, no locks
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the request took hold
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec
