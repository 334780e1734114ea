"""The ``pope`` command: one entry point that starts each service or tool.

    pope up --model DIR [--config FILE]       the whole stack on one machine
    pope engine --model DIR [--port 30000]    the CPU inference engine
    pope rollout | verifier | trainer         one service each
    pope trainer plan --config FILE           per-GPU memory of training its model (FSDP2 estimate)
    pope model init --out DIR                 build a tiny local model
    pope data import PATH | export OUT        problems in and out of the problem store
    pope config show SECTION [--config FILE]  print a section's resolved settings
    pope config docs                          print the configuration reference

Every service takes ``--config FILE`` (one YAML file, a section per service), and every
setting of its section as a flag (``pope trainer --help``; docs/configuration.md, made by
``pope config docs``). Heavy imports happen inside the command that needs them, so
``pope --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pydantic import BaseModel

from services.common.config import ConfigError, SectionSettings, check_shared_keys, load_settings, resolved
from services.common.settings_cli import add_field_flag, add_setting_flags, render_docs, settings_from_args
from services.restarts import RestartPolicy
from services.rollout.instructions import PRESETS as INSTRUCTION_PRESETS

if TYPE_CHECKING:
    from services.rollout.dataset import ImportOptions, ImportReport
    from services.rollout.dataset_files import SourceRow


def _settings_model(section: str) -> type[SectionSettings]:
    if section == "engine":
        from services.engine.settings import EngineSettings

        return EngineSettings
    if section == "rollout":
        from services.rollout.settings import RolloutSettings

        return RolloutSettings
    if section == "verifier":
        from services.verifier.settings import VerifierSettings

        return VerifierSettings
    if section == "trainer":
        from services.trainer.settings import TrainerSettings

        return TrainerSettings
    raise ConfigError(f"no settings section {section!r} (engine, rollout, verifier, trainer)")


# Options older than the generated ones (every setting is ``--field-name``), kept as aliases.
SETTING_ALIASES = {"model_path": ("--model",)}
SECTIONS = ("engine", "rollout", "verifier", "trainer")


def _engine(args: argparse.Namespace) -> int:
    from services.engine.settings import EngineSettings

    settings = settings_from_args(EngineSettings, args)
    from services.engine.server import serve

    serve(settings)
    return 0


def _up(args: argparse.Namespace) -> int:
    from services.up import up

    restart = (
        None
        if args.no_restart
        else RestartPolicy(crash_loop_deaths=args.crash_loop, crash_loop_window_s=args.crash_window)
    )
    return up(
        args.model,
        args.config,
        args.redis_url,
        args.problems,
        args.steps,
        args.run_dir,
        args.fresh,
        restart=restart,
        engines=args.engines,
    )


def _rollout(args: argparse.Namespace) -> int:
    from services.rollout.settings import RolloutSettings

    settings = settings_from_args(RolloutSettings, args)
    from services.rollout.service import serve

    serve(settings)
    return 0


def _trainer(args: argparse.Namespace) -> int:
    from services.trainer.settings import TrainerSettings

    settings = settings_from_args(TrainerSettings, args)
    from services.trainer.service import serve

    serve(settings)
    return 0


def _trainer_replay(args: argparse.Namespace) -> int:
    from services.trainer.settings import TrainerSettings

    settings = settings_from_args(TrainerSettings, args)
    groups = Path(args.groups)
    if not groups.is_file():
        print(f"pope trainer replay: no file {groups}", file=sys.stderr)
        return 2
    from services.trainer.service import replay_groups

    return replay_groups(settings, groups)


def _trainer_plan(args: argparse.Namespace) -> int:
    import tempfile

    from services.trainer import plan
    from services.trainer.settings import TrainerSettings

    settings = load_settings(TrainerSettings, args.config, model_path=args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            model_dir = Path(tmp)
            (model_dir / "config.json").write_text(json.dumps(plan.SHAPES[args.shape]))
        elif settings.model_path:
            model_dir = Path(settings.model_path).expanduser()
        else:
            print("pope trainer plan: no model (--model DIR, --shape, or trainer/shared model_path)", file=sys.stderr)
            return 2
        if not (model_dir / "config.json").is_file():
            print(f"pope trainer plan: no config.json in {model_dir}", file=sys.stderr)
            return 2
        shape, params = plan.model_params(model_dir)
    mbt, chunk, budget = settings.micro_batch_tokens, settings.logits_chunk_tokens, int(args.gpu_memory_gib * plan.GIB)
    act = 2 if settings.bf16 else 4
    fits = [plan.smallest_fit(shape, params, budget, mbt, chunk, checkpointed=c, act=act) for c in (False, True)]
    for n in args.nproc or [1]:
        pl = plan.plan(shape, params, n, mbt, chunk, act)
        print(plan.format_plan(pl, shape, args.gpu_memory_gib, *fits), end="\n\n")
    return 0


def _verifier(args: argparse.Namespace) -> int:
    from services.verifier.settings import VerifierSettings

    settings = settings_from_args(VerifierSettings, args)
    from services.verifier.service import serve

    serve(settings)
    return 0


def _model_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.engine.tiny_model import TinyModelSpec, build_tiny_model

    out = build_tiny_model(Path(args.out), TinyModelSpec(seed=args.seed))
    print(f"wrote a tiny Qwen3 model and tokenizer to {out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    import asyncio

    from redis.exceptions import RedisError

    from services.rollout import dataset
    from services.rollout.dataset_files import DatasetError, read_rows
    from services.rollout.instructions import instruction
    from services.rollout.settings import RolloutSettings

    settings = load_settings(RolloutSettings, args.config, redis_url=args.redis_url, key_prefix=args.key_prefix)
    try:
        if args.action == "export":
            n = asyncio.run(_data_export(settings.redis_url, settings.key_prefix, args))
            print(f"wrote {n} problems to {args.out}")
            return 0
        strip = instruction(args.strip_instruction, args.strip_pattern)
        options = dataset.ImportOptions(
            dataset.parse_map(args.map), args.split, args.source, args.allow_leakage, instruction=strip
        )
        rows = read_rows(args.file, args.hf_split)
        print(f"reading {rows.what}", flush=True)
        report = asyncio.run(_data_import(settings.redis_url, settings.key_prefix, rows, options))
    except (ValueError, OSError, DatasetError, RedisError) as exc:
        print(f"pope data {args.action}: {exc}", file=sys.stderr)
        return 1
    print(dataset.format_report(report))
    return 0 if report.imported + report.replaced > 0 or not report.errors else 1


async def _data_import(url: str, prefix: str, rows: Iterable[SourceRow], options: ImportOptions) -> ImportReport:
    from services.rollout.dataset import import_rows, problem_store

    async with problem_store(url, prefix) as store:
        return await import_rows(store, rows, options)


async def _data_export(url: str, prefix: str, args: argparse.Namespace) -> int:
    from services.rollout.dataset import export_problems, problem_store

    async with problem_store(url, prefix) as store:
        return await export_problems(store, args.out, args.split, args.label)


def _config_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(_settings_model(args.section), args)
    print(json.dumps(resolved(settings), indent=2, sort_keys=True))
    return 0


def _config_docs(args: argparse.Namespace) -> int:
    print(render_docs([_settings_model(s) for s in SECTIONS], SETTING_ALIASES), end="")
    return 0


def _service_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    """A command taking ``--config`` and every setting of section ``name`` as a flag."""
    usage = "%(prog)s [-h] [--config FILE] [--<setting> VALUE ...]"
    p = sub.add_parser(name, help=help, description=help, usage=usage)
    p.add_argument("--config", metavar="FILE", help="YAML config file (a section per service)")
    add_setting_flags(p, _settings_model(name), SETTING_ALIASES)
    return p


def _trainer_plan_parser(trainer: argparse.ArgumentParser) -> None:
    """``pope trainer plan``: an optional subcommand, so ``pope trainer --port ...`` serves as before."""
    trainer.usage = "%(prog)s [-h] [--config FILE] [--<setting> VALUE ...] | %(prog)s plan ... | %(prog)s replay ..."
    actions = trainer.add_subparsers(dest="trainer_action", metavar="plan | replay")
    help = "train the steps a trainer recorded (trainer.record_groups) again, with no Redis and no engine"
    replay = actions.add_parser("replay", prog="pope trainer replay", help=help, description=help)
    replay.add_argument("--groups", required=True, metavar="FILE", help="the recorded groups (JSON lines)")
    replay.add_argument("--config", metavar="FILE", help="YAML config file (its trainer section)")
    add_setting_flags(replay, _settings_model("trainer"), SETTING_ALIASES)
    replay.set_defaults(func=_trainer_replay)
    help = "per-GPU memory of training the config's model (FSDP2 over N ranks), and the fewest GPUs that fit"
    plan = actions.add_parser("plan", prog="pope trainer plan", help=help, description=help)
    plan.add_argument("--config", metavar="FILE", help="YAML config file; reads the 'trainer' section")
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="HF model directory (default trainer/shared model_path)")
    source.add_argument("--shape", choices=["qwen3-4b"], help="a known model's config.json, no download")
    plan.add_argument("--nproc", type=int, action="append", metavar="N", help="ranks to shard over (repeatable; 1)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, metavar="G", help="memory of one GPU (80)")
    plan.set_defaults(func=_trainer_plan)


def _add_data_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="import problems from dataset files, export them")
    actions = data.add_subparsers(dest="action", required=True)
    imp = actions.add_parser(
        "import",
        help="import problems (.jsonl, .json, .parquet, a Hub snapshot folder, a save_to_disk folder)",
        description="Import problems into the problem store: bad rows are reported by line and field, the rest "
        "import; duplicates are dropped; a train problem that is also an eval problem is excluded from training. "
        "Recipes for real datasets (verl/DAPO-Math-17k, Omni-MATH): docs/data.md.",
    )
    imp.add_argument(
        "file",
        type=Path,
        metavar="PATH",
        help="a dataset file, or a folder: its data files, subfolders included, of split --hf-split",
    )
    imp.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=PATH",
        help="read Problem FIELD from column PATH (repeatable): a column, or a path into nested values "
        "(reward_model.ground_truth, prompt[0].content, prompt[role=user].content); a prompt that is a list "
        "of chat messages is read as its last user message",
    )
    imp.add_argument("--split", choices=["train", "eval"], default="train", help="split of rows without one")
    imp.add_argument("--source", metavar="NAME", help="source of rows without one")
    imp.add_argument(
        "--hf-split",
        default="train",
        metavar="NAME",
        help="which files of a folder to read: the split their names name (train, validation, test), or "
        "a DatasetDict's split (default: train)",
    )
    imp.add_argument(
        "--strip-instruction",
        choices=sorted(INSTRUCTION_PRESETS),
        help="take a dataset's own answer-format instruction out of every prompt, so the project's template "
        "(\\boxed{}) applies: dapo (DAPO-Math-17k's), verl-math, verl-gsm8k (the sentence verl's preprocessing "
        "appends); rows without it are reported",
    )
    imp.add_argument(
        "--strip-pattern",
        action="append",
        default=[],
        metavar="REGEX",
        help="take every match of REGEX out of every prompt (repeatable); rows without a match are reported",
    )
    imp.add_argument(
        "--allow-leakage",
        action="store_true",
        help="keep train problems that are also eval problems in training (still reported)",
    )
    exp = actions.add_parser("export", help="write stored problems as JSONL (every field)")
    exp.add_argument("out", type=Path, metavar="OUT", help="JSONL file to write")
    exp.add_argument("--split", choices=["train", "eval"], help="only this split")
    labels = ["easy", "hard_hinted", "hard_unsolved", "none"]
    exp.add_argument("--label", choices=labels, help="only this label ('none': not labelled yet)")
    for p in (imp, exp):
        p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL, else redis://127.0.0.1:6379/0)")
        p.add_argument("--key-prefix", metavar="PREFIX", help="prefix of every Redis key (default pope:)")
        p.add_argument("--config", metavar="FILE", help="YAML config file; reads redis_url, key_prefix of 'rollout'")
        p.set_defaults(func=_data)


def _hints_build(args: argparse.Namespace) -> int:
    from services.offline import hints_build

    return hints_build(args)


def _eval(args: argparse.Namespace) -> int:
    from services.offline import eval_command

    return eval_command(args)


def _offline_flags(p: argparse.ArgumentParser, what: str, model: type[BaseModel]) -> None:
    """Where the problems, the engine and the verifier are (shared by hints build and eval)."""
    p.add_argument("--model", metavar="DIR", help="the model (its tokenizer builds the prompts)")
    p.add_argument("--config", metavar="FILE", help=f"YAML config file; reads the 'rollout' section and {what}")
    p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL, else 127.0.0.1:6379, else a private one)")
    p.add_argument("--key-prefix", metavar="PREFIX", help="prefix of every Redis key (default pope:)")
    p.add_argument("--engine-url", help="inference engine (default http://127.0.0.1:30000; started if absent)")
    p.add_argument("--verifier-url", help="verifier service (default http://127.0.0.1:8001; started if absent)")
    p.add_argument("--problem-id", action="append", metavar="ID", help="only this problem (repeatable)")
    for name in ("concurrency", "seed", "max_new_tokens"):
        add_field_flag(p, model, name, type=int)
    p.add_argument("--run-dir", type=Path, default=Path("runs"), help="logs of an engine/verifier it starts (runs/)")


def _eval_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.rollout.settings import EvalSettings

    help = "pass@1 and pass@k (unbiased estimator) through the engine and the verifier"
    e = sub.add_parser("eval", help=help, description=help + "; writes JSON and a markdown table.")
    _offline_flags(e, "rollout.evaluation", EvalSettings)
    add_field_flag(e, EvalSettings, "split", choices=["train", "eval"])
    add_field_flag(e, EvalSettings, "k", type=int)
    add_field_flag(e, EvalSettings, "hinted", action="store_true")
    add_field_flag(e, EvalSettings, "temperature", type=float)
    add_field_flag(e, EvalSettings, "top_p", type=float)
    add_field_flag(e, EvalSettings, "limit", type=int)
    e.add_argument("--out", default="runs/eval", help="directory of the JSON and markdown (default runs/eval)")
    e.add_argument("--name", help="file name stem (default eval-<split>)")
    e.set_defaults(func=_eval)


def _hints_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.rollout.settings import HintSettings

    actions = sub.add_parser("hints", help="the hard-problem filter and hint (privileged prefix) search")
    help = "label problems easy / hard_hinted / hard_unsolved and find each hard one's shortest helpful prefix"
    b = actions.add_subparsers(dest="action", required=True).add_parser(
        "build",
        help=help,
        description=help + ". Resumable: a rerun skips problems already searched with the "
        "same settings. Uses the engine and verifier at the configured URLs, or starts its own.",
    )
    _offline_flags(b, "rollout.hints", HintSettings)
    b.add_argument("--split", choices=["train", "eval"], default="train", help="problems of this split (train)")
    add_field_flag(b, HintSettings, "k", type=int)
    add_field_flag(b, HintSettings, "k_hint", type=int)
    add_field_flag(b, HintSettings, "max_fraction", type=float)
    add_field_flag(b, HintSettings, "method", choices=["linear", "galloping"])
    b.add_argument("--redo", action="store_true", help="search again problems already searched with these settings")
    b.set_defaults(func=_hints_build)


def _experiment_commands() -> ModuleType | None:
    """The experiment commands (experiments/cli.py), where that package is installed: in a
    checkout and with the ``experiments`` extra, not in the service images."""
    try:
        import experiments.cli
    except ModuleNotFoundError as exc:
        if exc.name not in ("experiments", "experiments.cli"):
            raise
        return None
    return experiments.cli


def _router(args: argparse.Namespace) -> int:
    from services import router

    try:
        router.run(args.host, args.port, args.prometheus_port, args.log_level)
    except router.RouterMissing as exc:
        print(f"pope router: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached: run execs the router


def build_parser() -> argparse.ArgumentParser:
    experiments = _experiment_commands()
    parser = argparse.ArgumentParser(
        prog="pope", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="start Redis (if needed), engine, rollout, verifier and trainer",
        description="Start the whole stack as separate processes from one config; Ctrl-C stops it.",
    )
    up.add_argument("--model", metavar="DIR", help="HF-format model directory (engine, trainer, tokenizer)")
    up.add_argument("--config", metavar="FILE", help="YAML config file (a section per service)")
    up.add_argument("--redis-url", help="use this Redis (default: REDIS_URL, else 127.0.0.1:6379, else a private one)")
    up.add_argument("--problems", metavar="FILE", type=Path, help="submit these problems (JSON list or JSONL)")
    up.add_argument("--steps", type=int, help="stop once the trainer has taken this many steps")
    up.add_argument("--run-dir", type=Path, default=Path("runs"), help="where logs go (default: runs/)")
    up.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run: delete this run's Redis keys (key_prefix), checkpoints and rollouts",
    )
    policy = RestartPolicy()
    up.add_argument(
        "--crash-loop",
        type=int,
        metavar="N",
        default=policy.crash_loop_deaths,
        help=f"a service that dies is restarted (backoff {policy.first_delay_s:.0f}s doubling to "
        f"{policy.max_delay_s:.0f}s); N deaths of one service within --crash-window stop the stack "
        f"(default: {policy.crash_loop_deaths})",
    )
    up.add_argument(
        "--crash-window",
        type=float,
        metavar="SECONDS",
        default=policy.crash_loop_window_s,
        help=f"see --crash-loop (default: {policy.crash_loop_window_s:.0f})",
    )
    up.add_argument("--no-restart", action="store_true", help="a service that dies stops the stack at once")
    up.add_argument(
        "--engines",
        type=int,
        default=1,
        metavar="N",
        help="N CPU engines behind SGLang's router (needs sglang-router), every one kept on the trainer's "
        "weights (default: 1, no router)",
    )
    up.set_defaults(func=_up)

    # Every setting of a service's section is a flag (services/common/settings_cli.py).
    engine = _service_parser(sub, "engine", "the CPU inference engine (SGLang's native API)")
    engine.set_defaults(func=_engine)
    rollout = _service_parser(sub, "rollout", "the rollout service: problems, HTTP API, hinted/unhinted scheduling")
    rollout.set_defaults(func=_rollout)
    trainer = _service_parser(sub, "trainer", "the GRPO trainer: updates, checkpoints, weight pushes")
    trainer.set_defaults(func=_trainer)
    _trainer_plan_parser(trainer)
    verifier = _service_parser(sub, "verifier", "the verifier service: math-verify scoring of raw groups")
    verifier.set_defaults(func=_verifier)

    router = sub.add_parser(
        "router",
        help="SGLang's router (sglang-router) in front of several engines",
        description="SGLang's router, no workers at start: the trainer adds each engine once it serves its weights.",
    )
    router.add_argument("--host", default="127.0.0.1", help="interface it binds (default: 127.0.0.1)")
    router.add_argument("--port", type=int, default=30000, help="its port (default: 30000, SGLang's)")
    router.add_argument("--prometheus-port", type=int, default=29000, help="its metrics port (default: 29000)")
    router.add_argument("--log-level", default="warn", choices=["debug", "info", "warn", "error"])
    router.set_defaults(func=_router)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="action", required=True)
    init = model.add_parser("init", help="build a tiny HF-format model locally (no network)")
    init.add_argument("--out", metavar="DIR", required=True)
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokenizer corpus")
    init.set_defaults(func=_model_init)
    if experiments is not None:
        experiments.add_pretrain_parser(model)

    _add_data_parser(sub)
    _hints_parser(sub)
    _eval_parser(sub)
    if experiments is not None:
        experiments.add_parsers(sub)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print a section's resolved settings (file, environment, flags)")
    sections = show.add_subparsers(dest="section", required=True, metavar="SECTION")
    for name in SECTIONS:
        section = _service_parser(sections, name, f"the {name} section as resolved (secrets masked)")
        section.set_defaults(func=_config_show)
    docs = config.add_parser("docs", help="print the configuration reference (docs/configuration.md)")
    docs.set_defaults(func=_config_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (_rollout, _verifier, _trainer):  # the engine has its own serve
        from services.common.http import stop_while_starting

        stop_while_starting(args.command)
    try:
        if getattr(args, "config", None):
            check_shared_keys(args.config, [_settings_model(s) for s in SECTIONS])
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"pope: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
