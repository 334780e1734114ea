"""Where a Problem field's value sits in a dataset row: the column paths of ``--map``.

    problem                      a top-level column
    reward_model.ground_truth    a key of a struct (a nested object)
    prompt.0.content             an element of a list, by index (also ``prompt[0].content``;
                                 ``prompt[-1]`` is the last)
    prompt[role=user].content    the last element of a list whose ``role`` is ``user``

A column whose whole name is the path (a flat ``reward_model.ground_truth`` column, as
``pandas.json_normalize`` writes) wins over reading the path as nested keys. A ``prompt``
that is a list of chat messages (objects with ``role`` and ``content``, verl's layout) is
read as its last user message's content, so ``prompt`` and ``prompt[role=user].content``
read the same; system messages are dropped, since the project's template says how to
answer. Nested values come from pyarrow as dicts and lists; numpy arrays and scalars (rows
that went through pandas) are read as lists and plain numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class PathError(Exception):
    """A path does not lead to a value in this row; the message says where it stopped."""


@dataclass(frozen=True)
class Select:
    """A list element chosen by one of its keys: ``[role=user]``."""

    key: str
    value: str


Step = str | int | Select
"""A key (a dotted segment; on a list, an all-digit one is an index), an index, or a selector."""

_STEP = re.compile(r"\[(-?\d+)\]|\[([^\]=]+)=([^\]]*)\]|\.([^.\[\]]+)")


@dataclass(frozen=True)
class ColumnPath:
    text: str
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> ColumnPath:
        """``"prompt[role=user].content"`` -> steps ``("prompt", Select("role", "user"), "content")``."""
        head = re.match(r"[^.\[\]]+", text)
        if head is None:
            raise ValueError(f"column path {text!r} must start with a column name")
        steps: list[Step] = [head.group()]
        at = head.end()
        while at < len(text):
            m = _STEP.match(text, at)
            if m is None:
                raise ValueError(
                    f"column path {text!r}: cannot read {text[at:]!r} (use a.b, a.0, a[0] or a[key=value])"
                )
            index, key, value, name = m.groups()
            steps.append(int(index) if index is not None else Select(key, value) if key is not None else name)
            at = m.end()
        return cls(text, tuple(steps))

    def lookup(self, row: Mapping[str, Any]) -> Any:
        """The value at this path in ``row`` (None is a value: a null cell); PathError if absent."""
        if self.text in row:
            return plain(row[self.text])
        column = str(self.steps[0])  # the first step is always a name
        if column not in row:
            raise PathError(f"no column {column!r}")
        value = row[column]
        for i, step in enumerate(self.steps[1:], start=1):
            try:
                value = _step(plain(value), step)
            except _Absent as exc:  # where is rendered only on failure: lookups run once per row and field
                raise PathError(f"{self._render(i)} {exc}") from None
        return plain(value)

    def _render(self, n: int) -> str:
        """The first ``n`` steps as text: where a failed step stood."""
        out = ""
        for step in self.steps[:n]:
            if isinstance(step, Select):
                out += f"[{step.key}={step.value}]"
            elif isinstance(step, int):
                out += f"[{step}]"
            else:
                out += f".{step}" if out else step
        return out


class _Absent(Exception):
    """A step found nothing; the message reads after where it stood ("reward_model" + " is null")."""


def _step(value: Any, step: Step) -> Any:
    if value is None:
        raise _Absent("is null")
    if isinstance(step, str) and isinstance(value, Mapping):
        if step not in value:
            raise _Absent(f"has no key {step!r}; its keys: {', '.join(map(str, value)) or 'none'}")
        return value[step]
    if not isinstance(value, list):
        raise _Absent(f"is a {type(value).__name__}, not a {'list' if _is_index(step) else 'struct'}")
    if isinstance(step, Select):
        found = [item for item in value if isinstance(item, Mapping) and str(item.get(step.key)) == step.value]
        if not found:
            seen = sorted({str(item.get(step.key)) for item in value if isinstance(item, Mapping)})
            raise _Absent(f"has no element with {step.key}={step.value}; {step.key}s: {', '.join(seen) or 'none'}")
        return found[-1]
    if isinstance(step, str) and not re.fullmatch(r"-?\d+", step):
        raise _Absent(f"is a list, not a struct with key {step!r}")
    index = int(step)
    if not -len(value) <= index < len(value):
        raise _Absent(f"has {len(value)} elements, no index {index}")
    return value[index]


def _is_index(step: Step) -> bool:
    return not isinstance(step, str) or bool(re.fullmatch(r"-?\d+", step))


def plain(value: Any) -> Any:
    """numpy arrays as lists and numpy scalars as Python numbers; tuples as lists; the rest as is."""
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, tuple):
        return list(value)
    tolist = getattr(value, "tolist", None)  # numpy's ndarray and generic; pandas' arrays
    return tolist() if callable(tolist) else value


def is_chat(value: Any) -> bool:
    """A non-empty list of messages: objects with a ``role`` and a ``content``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def user_content(messages: list[Mapping[str, Any]]) -> Any:
    """The content of the last user message (the question, after any few-shot turns)."""
    for message in reversed(messages):
        if message["role"] == "user":
            return plain(message["content"])
    roles = ", ".join(str(m["role"]) for m in messages)
    raise PathError(f"chat messages with no user message; roles: {roles}")
