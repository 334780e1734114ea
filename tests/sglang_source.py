"""SGLang's own source as the contract, read with ``ast`` (SGLang itself cannot be imported
here: it needs CUDA builds of torch and its kernels). The files come from the pinned wheel
(``tests/conftest.py: sglang_source``); these helpers turn them into facts a test compares
the project's code with:

    server = Server.read(root)              # http_server.py + io_struct.py
    server.route("POST", "/generate")       # Route(path, methods, body="GenerateReqInput", ...)
    server.fields["UpdateWeightFromDiskReqInput"]["model_path"].required   # True
    cli_flags(root)["--enable-metrics"]     # "bool": a flag that takes no value

What counts as a route: a function decorated with ``@app.get/post/put/delete/api_route``
whose path is a string literal (routes named by environment variables are left out). A
route is deprecated when its handler logs a warning saying so (0.5.23 does this for
``/get_model_info`` on every call). Its body is the request structure of its one parameter
annotated with a class of io_struct.py (``obj: GenerateReqInput`` or
``obj: Annotated[UpdateWeightFromDiskReqInput, Body()]``); FastAPI decodes the JSON body into
it, and SGLang's structures ignore unknown keys, so a misspelled field would be dropped
silently: the tests refuse one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SAMPLING_PARAMS = "sglang/srt/sampling/sampling_params.py"
RUNNER_WEIGHTS = "sglang/srt/model_executor/model_runner_components/weight_updater.py"
TENSOR_BUCKET = "sglang/srt/weight_sync/tensor_bucket.py"
SCHEDULER_WEIGHTS = "sglang/srt/managers/scheduler_components/weight_updater.py"
AUTH = "sglang/srt/utils/auth.py"
COMMON = "sglang/srt/utils/common.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_FIELDS = "sglang/srt/arg_groups/fields"

VERBS = {"get": "GET", "post": "POST", "put": "PUT", "delete": "DELETE", "patch": "PATCH", "head": "HEAD"}


def parse(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / rel).read_text(), filename=rel)


@dataclass(frozen=True)
class Field:
    """One field of a request structure: its annotation and whether a body must carry it."""

    name: str
    annotation: ast.expr
    required: bool


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    handler: str
    body: str | None
    """The io_struct class the JSON body decodes into; None: the route reads no body."""
    deprecated: bool
    auth: str
    """The handler's ``auth_level``: "NORMAL" (none set), "ADMIN_OPTIONAL" or "ADMIN_FORCE"."""


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function of a module, nested ones too (routes sit under ``if`` blocks as well)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _is_deprecated(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("warning", "warn")
        ):
            for arg in node.args:
                text = " ".join(
                    c.value for c in ast.walk(arg) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
                if "deprecated" in text.lower():
                    return True
    return False


def _body_class(fn: ast.FunctionDef | ast.AsyncFunctionDef, structures: set[str]) -> str | None:
    for arg in fn.args.args + fn.args.kwonlyargs:
        ann = arg.annotation
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Annotated":
            ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
        if isinstance(ann, ast.Name) and ann.id in structures:
            return ann.id
    return None


def _routes_of(fn: ast.FunctionDef | ast.AsyncFunctionDef, structures: set[str]) -> Iterator[Route]:
    auth = "NORMAL"
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == "auth_level":
            level = deco.args[0]
            auth = level.attr if isinstance(level, ast.Attribute) else "NORMAL"
    for deco in fn.decorator_list:
        if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
            continue
        owner, verb = deco.func.value, deco.func.attr
        if not (isinstance(owner, ast.Name) and owner.id == "app") or not deco.args:
            continue
        path = deco.args[0]
        if not (isinstance(path, ast.Constant) and isinstance(path.value, str)):
            continue  # a path from the environment (the ollama / vertex routes)
        if verb == "api_route":
            [methods_kw] = [k.value for k in deco.keywords if k.arg == "methods"]
            methods = frozenset(ast.literal_eval(methods_kw))
        elif verb in VERBS:
            methods = frozenset({VERBS[verb]})
        else:
            continue  # app.websocket, app.exception_handler, ...
        yield Route(path.value, methods, fn.name, _body_class(fn, structures), _is_deprecated(fn), auth)


def _fields_of_class(cls: ast.ClassDef) -> dict[str, Field]:
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(stmt.annotation, ast.Subscript) and ast.unparse(stmt.annotation.value) == "ClassVar":
                continue
            required = stmt.value is None or (
                isinstance(stmt.value, ast.Call)
                and ast.unparse(stmt.value.func) == "field"
                and not {k.arg for k in stmt.value.keywords} & {"default", "default_factory"}
            )
            out[stmt.target.id] = Field(stmt.target.id, stmt.annotation, required)
    return out


def class_fields(tree: ast.Module) -> dict[str, dict[str, Field]]:
    """Every module-level class's fields, inherited ones included (bases defined in the
    same module), in definition order, base fields first."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    resolved: dict[str, dict[str, Field]] = {}

    def resolve(name: str) -> dict[str, Field]:
        if name not in resolved:
            cls = classes[name]
            fields: dict[str, Field] = {}
            for base in cls.bases:
                if isinstance(base, ast.Name) and base.id in classes:
                    fields.update(resolve(base.id))
            fields.update(_fields_of_class(cls))
            resolved[name] = fields
        return resolved[name]

    return {name: resolve(name) for name in classes}


@dataclass(frozen=True)
class Server:
    """SGLang's HTTP server as its source declares it."""

    routes: tuple[Route, ...]
    fields: dict[str, dict[str, Field]]
    """io_struct.py: class name -> its fields."""
    metrics_mounted: bool
    """/metrics is mounted on the main app (port) when the server runs with --enable-metrics."""

    @classmethod
    def read(cls, root: Path) -> Server:
        fields = class_fields(parse(root, IO_STRUCT))
        server = parse(root, HTTP_SERVER)
        routes = tuple(r for fn in functions(server) for r in _routes_of(fn, set(fields)))
        return cls(routes, fields, _metrics_mounted(server, parse(root, COMMON)))

    def route(self, method: str, path: str) -> Route | None:
        for r in self.routes:
            if r.path == path and method in r.methods:
                return r
        return None

    def paths(self) -> set[str]:
        return {r.path for r in self.routes} | ({"/metrics"} if self.metrics_mounted else set())


def _metrics_mounted(server: ast.Module, common: ast.Module) -> bool:
    """http_server.py calls add_prometheus_middleware(app) under a test of enable_metrics,
    and that function (utils/common.py) mounts "/metrics" on the app it is given."""
    guarded = any(
        isinstance(node, ast.If)
        and "enable_metrics" in ast.unparse(node.test)
        and any(isinstance(c, ast.Call) and ast.unparse(c.func) == "add_prometheus_middleware" for c in ast.walk(node))
        for node in ast.walk(server)
    )
    [adder] = [f for f in functions(common) if f.name == "add_prometheus_middleware"]
    mounts = any(
        isinstance(c, ast.Call)
        and ast.unparse(c.func) == "Mount"
        and c.args
        and ast.literal_eval(c.args[0]) == "/metrics"
        for c in ast.walk(adder)
    )
    return guarded and mounts


def calls_in(tree: ast.Module, name: str, owner: str | None = None) -> set[str]:
    """The names a function (method ``name`` of class ``owner``, or a module-level function)
    calls anywhere in its body, nested functions included: ``f(...)`` and ``x.f(...)`` -> "f"."""
    scope: list[ast.stmt] = tree.body
    if owner is not None:
        [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner]
        scope = cls.body
    [fn] = [n for n in scope if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name]
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            func = node.func
            out.add(func.attr if isinstance(func, ast.Attribute) else ast.unparse(func))
    return out


def functions_saying(tree: ast.Module, text: str) -> set[str]:
    """The functions whose body holds a string literal containing ``text``."""
    return {
        fn.name
        for fn in functions(tree)
        if any(isinstance(c, ast.Constant) and isinstance(c.value, str) and text in c.value for c in ast.walk(fn))
    }


def cli_flags(root: Path) -> dict[str, str]:
    """``sglang.launch_server``'s flags -> "bool" (takes no value) or "value". The server's
    flags are the ``A[T, ...]`` fields of the arg_groups/fields namespaces (named after the
    field unless ``Arg(cli_name=...)``, plus ``aliases``; ``no_cli`` ones are not flags) and
    the ones server_args.py adds by hand with ``parser.add_argument``."""
    flags: dict[str, str] = {}
    for module in sorted((root / ARG_FIELDS).glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            ann = node.annotation
            if not (
                isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "A" and isinstance(ann.slice, ast.Tuple)
            ):
                continue
            kind, meta = ann.slice.elts[0], ann.slice.elts[1]
            keywords: dict[str, Any] = {}
            if isinstance(meta, ast.Call):
                keywords = {k.arg: k.value for k in meta.keywords if k.arg}
                if "no_cli" in keywords and ast.literal_eval(keywords["no_cli"]):
                    continue
            is_bool = ast.unparse(kind) in ("bool", "Optional[bool]") and "action" not in keywords
            name = (
                ast.literal_eval(keywords["cli_name"])
                if "cli_name" in keywords
                else "--" + node.target.id.replace("_", "-")
            )
            for flag in [name, *(ast.literal_eval(keywords["aliases"]) if "aliases" in keywords else [])]:
                flags[flag] = "bool" if is_bool else "value"
    for node in ast.walk(parse(root, SERVER_ARGS)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            action = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("action", "")
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    flags[arg.value] = "bool" if "store_true" in action or "StoreTrue" in action else "value"
    return flags


PLAIN: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "dict": (dict,),
}


def accepts(annotation: ast.expr, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation, for the plain annotations request
    structures use (str, int, float, bool, None, Optional, Union, X | Y, Literal, List,
    Dict, Annotated); any other annotation accepts every value."""
    if isinstance(annotation, ast.Constant):
        if isinstance(annotation.value, str):  # a string annotation: "Optional[str]"
            return accepts(ast.parse(annotation.value, mode="eval").body, value)
        return annotation.value is not None or value is None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return accepts(annotation.left, value) or accepts(annotation.right, value)
    if isinstance(annotation, ast.Name):
        if annotation.id == "None":
            return value is None
        kinds = PLAIN.get(annotation.id)
        return kinds is None or (isinstance(value, kinds) and not (annotation.id == "int" and isinstance(value, bool)))
    if isinstance(annotation, ast.Subscript):
        head = ast.unparse(annotation.value)
        args = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        if head == "Optional":
            return value is None or accepts(args[0], value)
        if head == "Union":
            return any(accepts(a, value) for a in args)
        if head == "Literal":
            return value in [ast.literal_eval(a) for a in args]
        if head in ("List", "list"):
            return isinstance(value, list) and all(accepts(args[0], v) for v in value)
        if head in ("Dict", "dict"):
            return isinstance(value, dict)
        if head == "Annotated":
            return accepts(args[0], value)
    return True
