"""Cheap checks that keep what cannot be an answer away from math-verify.

math-verify's LaTeX parser and the sympy behind it are exponential or unbounded on some
inputs that no real answer looks like: 16 nested braces take minutes to parse,
``9^{9^{9}}`` and ``1000000!`` are evaluated digit by digit, ``(x+y+z+w)^{32}`` is
expanded term by term. The pool's kill-on-timeout (pool.py) stays the backstop, but
killing a worker costs the answer its verdict and the pool a restart; the guard refuses
such an answer in microseconds instead, and it scores 0 with the reason as its error.

``screen(completion, answer_of)`` runs first in scoring, ``screen_gold`` first in
parsing the gold answer:

1. Invisible and control characters are removed: C0/C1 controls other than tab and
   newline (NUL, the ESC of terminal escapes), DEL, bidirectional overrides and
   isolates, zero-width characters and the BOM. They carry no mathematical content, and
   a right-to-left override makes a box display as something other than what it says.
   Look-alikes (Cyrillic ``х``, fullwidth ``５``, mathematical ``𝟓``) are kept: they are
   other characters, and math-verify reads them as such.
2. Only the last ``TAIL_CHARS`` characters of a completion are examined; the final
   answer is at the end, and nothing upstream of it is parsed.
3. The answer (the last box, through ``answer_of``; where there is none, the whole
   examined text, which math-verify then searches) is refused when it
   - is a box of over ``MAX_ANSWER_CHARS`` characters;
   - defines macros (``\\def``, ``\\newcommand``, ``\\let``, ...), which nothing expands;
   - reads as Python (a dunder, ``lambda``, ``import``, ``eval(``, ...). math-verify does
     hand text to sympy's ``parse_expr`` (which uses ``eval``), but only runs of digits
     and operators; refusing code here keeps it that way whatever the extraction becomes;
   - nests brackets deeper than ``MAX_BRACKET_DEPTH`` or exponents deeper than
     ``MAX_EXPONENT_DEPTH`` (``a^{b^{c}}`` is depth 2);
   - holds an integer of over ``MAX_INTEGER_DIGITS`` digits, an exponent whose value
     (estimated from the numbers in it) is over ``MAX_EXPONENT``, a power of a sum whose
     expansion has over ``MAX_EXPANSION_TERMS`` terms, or a factorial, binomial or product
     of over ``MAX_FACTORIAL_ARG``.

Each limit is far past what a competition answer needs and below where math-verify took
a second on a 2-core machine (bench/verifier_adversarial.py measures the corpus of
tests/data/verifier/adversarial.jsonl).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

TAIL_CHARS = 16_000
MAX_ANSWER_CHARS = 500
MAX_BRACKET_DEPTH = 8  # 12 nested braces took math-verify 2.4 s, 16 over a minute
MAX_EXPONENT_DEPTH = 3
MAX_INTEGER_DIGITS = 1_000  # 10^6 digits took 3 s and 600 MB
MAX_EXPONENT = 10**6  # 10^{10^{6}} took 1 s, 10^{10^{10}} over a minute
MAX_EXPANSION_TERMS = 500  # (a+...+f)^6, 462 terms, took 1.3 s
MAX_FACTORIAL_ARG = 10_000  # 10^5! took 0.7 s, 10^6! over a minute

_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_MACROS = re.compile(
    r"\\(?:def|edef|gdef|xdef|let|futurelet|newcommand|renewcommand|providecommand|"
    r"DeclareMathOperator|newenvironment|renewenvironment|csname|expandafter|catcode|input|include)(?![A-Za-z])"
)
_CODE = re.compile(
    r"__\w+__|(?<![\\\w])(?:lambda|import)\b|\b(?:eval|exec|getattr|setattr|delattr|compile|globals|locals|vars)\s*\("
)
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|\d+(?:\.\d+)?|\*\*|\S")
_OPEN, _CLOSE = "{([", "})]"
_SEPARATORS = frozenset(
    ["+", "-", ",", ";", "=", "<", ">", "&", "\\pm", "\\mp", "\\le", "\\ge", "\\leq", "\\geq", "\\neq"]
)
_LAYOUT = frozenset(["\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\displaystyle", "\\,", "\\;", "\\!"])
_GREEK = re.compile(r"\\(?:alpha|beta|gamma|delta|epsilon|theta|lambda|mu|pi|phi|psi|omega|sigma|tau|rho|xi)")
_BINOMIALS = frozenset(["\\binom", "\\dbinom", "\\tbinom"])


class Refused(ValueError):
    """An answer the guard will not hand to math-verify: it scores 0 with this as its error."""

    def __init__(self, reason: str, extracted: str | None = None) -> None:
        super().__init__(reason)
        self.extracted = extracted[:MAX_ANSWER_CHARS] if extracted is not None else None


def clean(text: str) -> str:
    """``text`` without its invisible and control characters."""
    return _INVISIBLE.sub("", text)


def screen(completion: str, answer_of: Callable[[str], str | None]) -> str:
    """The part of ``completion`` that scoring may read, cleaned; raises Refused when the
    answer in it (``answer_of``, else all of it) cannot be a real answer."""
    text = clean(completion[-TAIL_CHARS:])
    answer = answer_of(text)
    if answer is not None and len(answer) > MAX_ANSWER_CHARS:
        raise Refused(f"the answer is over {MAX_ANSWER_CHARS} characters ({len(answer)})", answer)
    check(text if answer is None else answer, extracted=answer)
    if _MACROS.search(text):
        raise Refused("the completion defines LaTeX macros", answer)
    return text


def screen_gold(gold: str) -> str:
    """The gold answer, cleaned; raises Refused when it cannot be a real answer."""
    gold = clean(gold)
    if len(gold) > MAX_ANSWER_CHARS:
        raise Refused(f"the gold answer is over {MAX_ANSWER_CHARS} characters")
    check(gold, extracted=gold)
    return gold


def check(answer: str, extracted: str | None) -> None:
    """Raise Refused when ``answer`` could make math-verify spin or blow up."""
    if _MACROS.search(answer):
        raise Refused("the answer defines LaTeX macros", extracted)
    if _CODE.search(answer):
        raise Refused("the answer reads as Python code", extracted)
    depth = bracket_depth(answer)
    if depth > MAX_BRACKET_DEPTH:
        raise Refused(f"the answer nests brackets {depth} deep (at most {MAX_BRACKET_DEPTH})", extracted)
    try:
        tokens = ["^" if tok == "**" else tok for tok in _TOKEN.findall(answer)]  # 9**9 is plain math's 9^9
        _Estimator(tokens).group(tower=0)
    except Refused as exc:
        raise Refused(str(exc), extracted) from None
    except RecursionError:  # chains of \binom\binom...: nothing real nests like that
        raise Refused("the answer nests too deeply to read", extracted) from None


def bracket_depth(text: str) -> int:
    """The deepest nesting of ``{ ( [`` in ``text``, of any kind (stray closers ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in _CLOSE and depth:
            depth -= 1
    return deepest


@dataclass(frozen=True)
class _Value:
    """What the estimator knows of a subexpression."""

    log10: float = 0.0
    """log10 of the largest magnitude its numbers can give it (a symbol counts as 1)."""
    symbolic: bool = False
    """Holds a letter: a power of it is expanded, not evaluated."""
    summands: int = 1
    """Terms at its top level, when it is a bracketed sum holding a symbol, else 1."""
    product: bool = False
    """A ``\\prod``: its upper limit (``^``) is a number of factors."""


def _power(x: float) -> float:
    """10 ** x, infinite past what a float holds."""
    return 10.0**x if x < 300 else math.inf


class _Estimator:
    """A tolerant recursive-descent reading of LaTeX or plain math that estimates the size
    of what sympy would compute, and raises Refused past the limits. Anything it does not
    understand is an atom of size 1; recursion is bounded by the bracket depth (checked
    before) and the exponent depth (checked here)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def group(self, tower: int, nested: bool = False) -> _Value:
        """Terms up to the closing bracket (any kind: ``[0,1)`` is an interval) or the end."""
        terms: list[float] = [0.0]
        values: list[_Value] = []
        while (tok := self.peek()) is not None:
            self.i += tok in _CLOSE or tok in _SEPARATORS
            if tok in _CLOSE:
                if nested:
                    break
            elif tok in _SEPARATORS:
                terms.append(0.0)
            else:
                values.append(self.term(tower))
                terms[-1] += values[-1].log10  # juxtaposition, \cdot, / : at most a product
        if len(values) == 1 and len(terms) == 1:
            return values[0]  # one term keeps its kind: {(x+1)} is still a sum
        symbolic = any(v.symbolic for v in values)
        return _Value(max(terms), symbolic, len(terms) if symbolic else 1)

    def term(self, tower: int) -> _Value:
        """An atom and its postfix operators: ``^`` (right-associative), ``_``, ``!``."""
        base = self.atom(tower)
        while (tok := self.peek()) in ("^", "_", "!"):
            self.i += 1
            if tok == "_":
                self.atom(tower)
            elif tok == "!":
                base = _Value(self._factorial(base.log10), base.symbolic)
            else:
                if tower + 1 > MAX_EXPONENT_DEPTH:
                    raise Refused(f"the answer nests exponents over {MAX_EXPONENT_DEPTH} deep")
                base = self._raise(base, self.term(tower + 1))
        return base

    def atom(self, tower: int) -> _Value:
        while self.peek() in _LAYOUT:  # \left( is (
            self.i += 1
        tok = self.peek()
        if tok is None:
            return _Value()
        self.i += 1
        if tok in _OPEN:
            return self.group(tower, nested=True)
        if tok[0].isdecimal():
            digits = len(tok.split(".")[0])
            if digits > MAX_INTEGER_DIGITS:
                raise Refused(f"the answer has an integer of {digits} digits (at most {MAX_INTEGER_DIGITS})")
            return _Value(math.log10(max(float(tok), 1.0)) if digits < 300 else float(digits))
        if tok in _BINOMIALS:
            n, k = self.atom(tower), self.atom(tower)
            return _Value(self._factorial(max(n.log10, k.log10)), n.symbolic or k.symbolic)
        if tok == "\\prod":
            return _Value(product=True)
        return _Value(symbolic=tok.isalpha() or bool(_GREEK.fullmatch(tok)))

    def _raise(self, base: _Value, exponent: _Value) -> _Value:
        n = round(_power(exponent.log10), 6)
        if base.product:
            if n > MAX_FACTORIAL_ARG:
                raise Refused(f"the answer takes a product of {n:.3g} factors (at most {MAX_FACTORIAL_ARG})")
            return _Value(self._factorial(exponent.log10), symbolic=True)
        if n > MAX_EXPONENT:
            raise Refused(f"the answer has an exponent of about {n:.3g} (at most {MAX_EXPONENT:.0e})")
        if base.summands > 1 and math.comb(math.ceil(n) + base.summands - 1, base.summands - 1) > MAX_EXPANSION_TERMS:
            raise Refused(f"the answer raises a sum of {base.summands} terms to the power {n:g}")
        return _Value(base.log10 * n, base.symbolic or exponent.symbolic)

    @staticmethod
    def _factorial(log10: float) -> float:
        n = _power(log10)
        if n > MAX_FACTORIAL_ARG:
            raise Refused(f"the answer takes the factorial of about {n:.3g} (at most {MAX_FACTORIAL_ARG})")
        return n * math.log10(max(n, 1.0))
