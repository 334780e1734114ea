"""Nothing that came over the wire is ever run as code: no pickle, eval or exec on it.

Walks the import graph of every ``pope`` command (services/cli.py and everything it reaches
inside the project, lazy imports in functions included) and reads each module's syntax tree
for the ways bytes become code: the pickle family (pickle, marshal, shelve, dill,
cloudpickle and the torch.distributed ``*_object*`` collectives, which pickle), ``eval``,
``exec``, ``compile`` and ``__import__``, YAML's unsafe loaders, ``torch.load`` without
``weights_only=True``, ``trust_remote_code`` (a model directory's own Python, where the
trainer's weight pushes name the directory), and a shell command line. What is found must be on the list below,
each with the reason it carries nothing from the wire; a new use fails until it is judged.

math-verify hands answer text to sympy's ``parse_expr``, which evaluates: the services'
only caller of it is services/verifier/scoring.py, which screens every answer and gold
through the guard (services/verifier/guard.py refuses code) before math-verify sees it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "services.cli"

PICKLING_MODULES = frozenset({"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"})
CODE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})
PICKLING_COLLECTIVES = frozenset(
    {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "recv_object_list"}
)
UNSAFE_YAML = frozenset({"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"})

ALLOWED: dict[tuple[str, str], str] = {
    # (module, finding) -> why nothing from the wire reaches it
    ("services.verifier.pool", "Connection.recv"): (
        "the parent and its own forked scoring workers: the pickles are made by this code, of "
        "strings and Score dicts; wire text travels inside them as str values, never as pickle bytes"
    ),
    ("services.trainer.policy", "from torch import load"): (
        "torch.distributed.checkpoint's load of the trainer's own checkpoint (its .metadata is a "
        "pickle) from trainer.checkpoint_dir, written by the trainer; no request names that directory"
    ),
}


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module an ``import`` anywhere in ``tree`` names (functions' own included)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)  # a submodule, maybe


def reachable(entry: str) -> dict[str, ast.AST]:
    """The project's modules ``entry`` reaches, each parsed."""
    seen: dict[str, ast.AST] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        seen[name] = tree
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__
        todo += [m for m in imported(tree, name, path.name == "__init__.py") if m.split(".")[0] in {"services"}]
    return seen


def findings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in PICKLING_MODULES:
                    yield f"import {name}"
            torch_from = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch")
            if torch_from and any(a.name == "load" for a in node.names):
                yield "from torch import load"
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in CODE_BUILTINS:
            yield f"{func.id}()"
        if not isinstance(func, ast.Attribute):
            continue
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        if isinstance(func.value, ast.Attribute) and func.value.attr == "serialization":
            owner = "torch"  # torch.serialization.load
        keywords = {k.arg: k.value for k in node.keywords}
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            yield "trust_remote_code"  # a model directory's own Python, run
        if func.attr in PICKLING_COLLECTIVES:
            yield func.attr
        elif owner == "yaml" and func.attr in UNSAFE_YAML:
            yield f"yaml.{func.attr}"
        elif owner == "torch" and func.attr == "load":
            safe = keywords.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                yield "torch.load without weights_only=True"
        elif func.attr == "recv" and not node.args:
            yield "Connection.recv"  # multiprocessing's unpickles what it reads
        elif owner in {"subprocess", "asyncio"} and "shell" in keywords:
            shell = keywords["shell"]
            if not (isinstance(shell, ast.Constant) and shell.value is False):
                yield "a shell command line"
        elif owner == "asyncio" and func.attr == "create_subprocess_shell":
            yield "a shell command line"


def test_the_walk_reaches_every_service() -> None:
    modules = reachable(ENTRY)
    for service in ("engine.server", "rollout.service", "verifier.service", "trainer.service", "trainer.fleet"):
        assert f"services.{service}" in modules, sorted(modules)
    assert len(modules) > 60, len(modules)


def test_nothing_from_the_wire_is_unpickled_or_evaluated() -> None:
    found = {(module, what) for module, tree in reachable(ENTRY).items() for what in findings(tree)}
    unjudged = sorted(found - set(ALLOWED))
    assert not unjudged, f"ways bytes could become code, not judged safe (see ALLOWED): {unjudged}"
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"ALLOWED lists uses that are gone: {stale}"


def test_the_checks_see_what_they_look_for() -> None:
    source = """
import pickle
from marshal import loads
import yaml, torch, subprocess
eval(x); exec(y)
yaml.load(s); yaml.safe_load(s)
torch.load(p); torch.load(p, weights_only=True); torch.serialization.load(p)
from torch import load
AutoModel.from_pretrained(path, trust_remote_code=True); AutoModel.from_pretrained(path)
dist.broadcast_object_list(objs)
conn.recv()
subprocess.run(cmd, shell=True); subprocess.run(argv)
"""
    got = sorted(findings(ast.parse(source)))
    assert got == sorted(
        [
            "import pickle",
            "import marshal",
            "eval()",
            "exec()",
            "yaml.load",
            "torch.load without weights_only=True",
            "torch.load without weights_only=True",
            "from torch import load",
            "trust_remote_code",
            "broadcast_object_list",
            "Connection.recv",
            "a shell command line",
        ]
    ), got


def test_math_verify_is_reached_only_through_the_guard() -> None:
    modules = reachable(ENTRY)
    callers = sorted(m for m, tree in modules.items() if "math_verify" in set(_imports(tree)))
    assert callers == ["services.verifier.scoring"], callers
    scoring = ast.unparse(modules["services.verifier.scoring"])
    for function in ("parse_gold", "score_answer"):
        body = scoring[scoring.index(f"def {function}") :]
        body = body[: body.index("\ndef ", 1)] if "\ndef " in body[1:] else body
        assert "guard.screen_" in body and body.index("guard.screen_") < body.index("parse("), function


def _imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]
