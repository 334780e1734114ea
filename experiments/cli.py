"""The experiment commands of ``pope``: ``pope demo``, ``pope experiment pope-vs-grpo`` and
``pope model pretrain``. ``services.cli`` adds them when this package is installed (a
checkout, or ``pip install 'pope-rl[experiments]'``); the service images leave it out.

Building the parsers imports nothing heavy; each command imports its machinery when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _interruptible(run: Callable[[], object]) -> int:
    """Run a long job so that Ctrl-C and SIGTERM both stop it cleanly (the services it
    started are stopped by their context managers); 130 when interrupted."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        run()
    except KeyboardInterrupt:
        print("pope: interrupted; what finished is kept: run the same command to go on", file=sys.stderr)
        return 130
    return 0


def _need_plots(command: str) -> None:
    """The report's plots need matplotlib (the ``experiments`` extra): say so before hours of work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"pope {command}: the report needs matplotlib: pip install 'pope-rl[experiments]'")


def _experiment(args: argparse.Namespace) -> int:
    from experiments.experiment import experiment
    from experiments.spec import ARMS, Spec, base_model_or_exit, spec_with

    _need_plots("experiment")
    base = base_model_or_exit(Path(args.base_model))
    spec = spec_with(
        Spec(), base, args.trainer, steps=args.steps, learning_rate=args.lr, train_problems=args.train_problems
    )
    arms = args.arms.split(",") if args.arms else list(ARMS)
    return _interruptible(lambda: experiment(Path(args.dir), base, args.seeds, arms, spec, parallel=args.parallel))


def _demo(args: argparse.Namespace) -> int:
    from experiments.demo import DEMO_SPEC, demo
    from experiments.spec import base_model_or_exit, spec_with

    _need_plots("demo")
    base = base_model_or_exit(Path(args.base_model))
    spec = spec_with(DEMO_SPEC, base, args.trainer, steps=args.steps, learning_rate=args.lr)
    return _interruptible(lambda: demo(Path(args.dir), base, spec))


def _model_pretrain(args: argparse.Namespace) -> int:
    from experiments.pretrain import STEPS, check_settings, pretrain

    start = Path(args.start) if args.start else None
    try:
        check_settings(Path(args.out), STEPS if args.steps is None else args.steps, args.lr, start)
    except ValueError as e:
        raise SystemExit(f"pope model pretrain: {e}") from None
    pretrain(Path(args.out), steps=args.steps, seed=args.seed, device=args.device, lr=args.lr, start=start)
    print(f"wrote the base model and pretrain_report.json to {args.out}")
    return 0


def add_pretrain_parser(model: Any) -> None:
    """``pope model pretrain`` under the ``model`` command's sub-parsers."""
    help = "train the POPE-vs-GRPO experiment's base model from scratch (easy material only)"
    pre = model.add_parser("pretrain", help=help, description=help + "; reports accuracy easy/hard, hinted/unhinted.")
    pre.add_argument("--out", metavar="DIR", required=True)
    pre.add_argument(
        "--steps",
        type=int,
        help="training steps (default 2700, 11-22 min on 2 cores); the model depends on the code, the steps and "
        "the seed only",
    )
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default cpu)")
    pre.add_argument(
        "--from",
        dest="start",
        metavar="DIR",
        help="go on from this model (and its tokenizer) instead of from scratch, e.g. an earlier task version's base",
    )
    pre.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the cosine (default 1e-3)")
    pre.set_defaults(func=_model_pretrain)


def add_parsers(sub: Any) -> None:
    """``pope experiment pope-vs-grpo`` and ``pope demo`` under ``pope``'s sub-parsers."""
    help = "POPE vs GRPO on the link-chains task (matched compute), resumable; writes a table and a report"
    exp = sub.add_parser("experiment", help="POPE vs GRPO runs").add_subparsers(dest="name", required=True)
    pvg = exp.add_parser("pope-vs-grpo", help=help, description=help)
    pvg.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 of every arm (default 4)")
    pvg.add_argument("--arms", help="comma-separated subset of pope,grpo,grpo_easy,hinted_only (default: all)")
    pvg.add_argument("--dir", default="runs/experiment", help="experiment directory (default runs/experiment)")
    demo = sub.add_parser("demo", help="a short POPE run on the link-chains task and its HTML report")
    demo.add_argument("--dir", default="runs/demo-pope", help="run directory (default runs/demo-pope)")
    for p in (pvg, demo):
        p.add_argument(
            "--base-model",
            default="data/base-model",
            help="from pope model pretrain (default data/base-model, the repository's own)",
        )
        p.add_argument("--steps", type=int, help="trainer steps per run (frozen with the experiment)")
        p.add_argument("--lr", type=float, help="learning rate (frozen with the experiment)")
        help = "a trainer setting, e.g. kl_coef=0.05 (repeatable; frozen with the experiment)"
        p.add_argument("--trainer", action="append", default=[], metavar="KEY=VALUE", help=help)
    pvg.add_argument("--train-problems", type=int, help="hard train problems (frozen with the experiment)")
    help = "runs at a time, each with its share of the cores (default 1); not frozen: any sitting may change it"
    pvg.add_argument("--parallel", type=int, default=1, metavar="N", help=help)
    pvg.set_defaults(func=_experiment)
    demo.set_defaults(func=_demo)
