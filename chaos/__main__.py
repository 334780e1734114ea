"""``python -m chaos --short|--long --seed N --dir DIR``: one chaos run (chaos/run.py)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from chaos.schedule import FORMS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    form = parser.add_mutually_exclusive_group(required=True)
    for name, f in FORMS.items():
        form.add_argument(
            f"--{name}", dest="form", action="store_const", const=name, help=f"{f.faults} faults, {f.steps} steps"
        )
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault schedule")
    parser.add_argument("--dir", type=Path, default=Path("runs/chaos"), help="the run directory (wiped first)")
    parser.add_argument(
        "--allow-crashes", action="store_true", help="a service exiting without being killed does not fail the run"
    )
    parser.add_argument(
        "--trainer-nproc", type=int, default=1, metavar="N", help="trainer ranks (torchrun, FSDP2 on gloo); 1"
    )
    parser.add_argument(
        "--engines", type=int, default=1, metavar="N", help="engines behind SGLang's router (kills hit one); 1"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)  # a SIGTERM stops the stack too, as Ctrl-C does
    from chaos.run import run

    try:
        return run(
            FORMS[args.form],
            args.seed,
            args.dir,
            args.allow_crashes,
            trainer_nproc=args.trainer_nproc,
            engines=args.engines,
        )
    except KeyboardInterrupt:
        print("chaos: interrupted; the stack is stopped, no verdict")
        return 130


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
