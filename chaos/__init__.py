"""The chaos run: the whole stack trained for a fixed number of steps while an injector,
on a seeded schedule, kill -9s and restarts every service and Redis, and SIGSTOPs services
past their lease; at the end the durable records must account for every planned group.

    python -m chaos --short --seed 0 --dir runs/chaos-short     # 6 faults, in make test
    python -m chaos --long --seed 0 --dir runs/chaos            # make chaos: 56 faults

Parts: schedule.py (the forms and the seeded schedule, pure), procs.py (a restartable
process), stack.py (the stack on its own Redis, supervised), injector.py (applies the
faults), checks.py (the end-of-run checks), run.py (one run, start to verdict). Not part
of the services or their image.
"""
