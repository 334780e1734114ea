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
3. The answer (the final answer under the scoring policy, through ``answer_of``; where there is none, the whole
   examined text, which math-verify then searches) is refused when it
   - is a box of over ``MAX_ANSWER_CHARS`` characters;
   - defines macros (``\\def``, ``\\newcommand``, ``\\let``, ...), which nothing expands;
   - reads as Python (a dunder, ``lambda``, ``import``, ``eval(``, ...). math-verify does
     hand text to sympy's ``parse_expr`` (which uses ``eval``), but only runs of digits
     and operators; refusing code here keeps it that way whatever the extraction becomes;
   - nests brackets deeper than ``MAX_BRACKET_DEPTH`` or exponents deeper than
     ``MAX_EXPONENT_DEPTH`` (``a^{b^{c}}`` is depth 2);
   - holds an integer of over ``MAX_INTEGER_DIGITS`` digits, an exponent whose value
     (estimated from the numbers in it) is over ``MAX_EXPONENT``, a factorial or binomial
     of over ``MAX_FACTORIAL_ARG``, a ``\\sum`` or ``\\prod`` of over ``MAX_SUM_TERMS``
     terms, or a polynomial whose expansion has over ``MAX_EXPANSION_TERMS`` terms
     (``(x+1)^{100}(y+1)^{100}`` has 10,201);
   - is an integral, which sympy would try to evaluate with no bound at all.

What stays slow within these limits (``\\sum_{k=0}^{100} \\binom{100}{k} x^k y^{100-k}``
takes 10 s) is the pool's to cut off.

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
MAX_SUM_TERMS = 100  # \sum_{k=0}^{1000} \binom{1000}{k} x^k took over a minute

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
_SUMS = frozenset(["+", "-", "\\pm", "\\mp"])
_SEPARATORS = _SUMS | {",", ";", ".", ":", "?", "=", "<", ">", "&", "\\le", "\\ge", "\\leq", "\\geq", "\\neq"}
_LAYOUT = frozenset(["\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\displaystyle", "\\,", "\\;", "\\!"])
_GREEK = re.compile(r"\\(?:alpha|beta|gamma|delta|epsilon|theta|lambda|mu|pi|phi|psi|omega|sigma|tau|rho|xi)")
_BINOMIALS = frozenset(["\\binom", "\\dbinom", "\\tbinom"])
_INTEGRAL = re.compile(r"\\(?:int|iint|iiint|oint)(?![A-Za-z])")


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
    text = tail(completion)
    screen_answer(text, answer_of(text))
    return text


def tail(completion: str) -> str:
    """The part of ``completion`` that scoring may read: its last ``TAIL_CHARS``, cleaned."""
    return clean(completion[-TAIL_CHARS:])


def screen_answer(text: str, answer: str | None) -> None:
    """Raise Refused when ``answer``, read from ``text`` (a ``tail``; all of it where the
    answer is None), cannot be a real answer."""
    if answer is not None and len(answer) > MAX_ANSWER_CHARS:
        raise Refused(f"the answer is over {MAX_ANSWER_CHARS} characters ({len(answer)})", answer)
    check(text if answer is None else answer, extracted=answer)
    if _MACROS.search(text):
        raise Refused("the completion defines LaTeX macros", answer)


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
    if _INTEGRAL.search(answer):
        raise Refused("the answer is an integral, which sympy would evaluate without bound", extracted)
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
    terms: int = 1
    """Terms it has once expanded ((x+1)(y+1) has 4), when it holds a letter."""
    big_operator: bool = False
    """A ``\\sum`` or ``\\prod``: its upper limit (``^``) is a number of terms."""


def _power(x: float) -> float:
    """10 ** x, infinite past what a float holds."""
    return 10.0**x if x < 300 else math.inf


def _expansion(terms: int) -> int:
    """``terms``, refused past MAX_EXPANSION_TERMS."""
    if terms > MAX_EXPANSION_TERMS:
        raise Refused(f"the answer expands to over {MAX_EXPANSION_TERMS} terms")
    return terms


def _capped(terms: int) -> int:
    """``terms`` while counting: just past the limit is as bad as any more."""
    return min(terms, MAX_EXPANSION_TERMS + 1)


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
        """Up to the closing bracket (any kind: ``[0,1)`` is an interval) or the end. Its
        parts between separators are products of what they hold (juxtaposition, ``\\cdot``,
        ``/``); their sizes combine by max, their expanded terms add across ``+`` and
        ``-`` and combine by max across the rest (``,`` ``=`` ...)."""
        values: list[_Value] = []
        size, log10 = 0.0, 0.0  # the largest part so far, the part in hand
        terms, summed, factors = 1, 0, 0  # most terms of a clause, the clause in hand, the part's
        while (tok := self.peek()) is not None:
            self.i += tok in _CLOSE or tok in _SEPARATORS
            if tok in _CLOSE and nested:
                break
            if tok in _SEPARATORS:
                size, log10 = max(size, log10), 0.0
                summed, factors = _capped(summed + factors), 0
                if tok not in _SUMS:
                    terms, summed = max(terms, summed), 0
            elif tok not in _CLOSE:
                values.append(value := self.term(tower))
                log10 += value.log10
                factors = _capped(max(factors, 1) * value.terms)
        if len(values) == 1 and summed == 0:
            return values[0]  # one term keeps its kind: {(x+1)} is still a sum
        symbolic = any(v.symbolic for v in values)
        terms = _expansion(max(terms, summed + factors)) if symbolic else 1
        return _Value(max(size, log10), symbolic, terms)

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
        if tok in ("\\sum", "\\prod"):
            return _Value(big_operator=True)
        return _Value(symbolic=tok.isalpha() or bool(_GREEK.fullmatch(tok)))

    def _raise(self, base: _Value, exponent: _Value) -> _Value:
        n = round(_power(exponent.log10), 6)
        if base.big_operator:
            if n > MAX_SUM_TERMS:
                raise Refused(f"the answer has a sum or product of {n:.3g} terms (at most {MAX_SUM_TERMS})")
            return _Value(self._factorial(exponent.log10), symbolic=True)
        if n > MAX_EXPONENT:
            raise Refused(f"the answer has an exponent of about {n:.3g} (at most {MAX_EXPONENT:.0e})")
        terms = base.terms
        if terms > 1 and not exponent.symbolic:  # (a+b)^n: the monomials of degree n in a and b
            terms = _expansion(math.comb(math.ceil(n) + terms - 1, terms - 1))
        return _Value(base.log10 * n, base.symbolic or exponent.symbolic, terms)

    @staticmethod
    def _factorial(log10: float) -> float:
        n = _power(log10)
        if n > MAX_FACTORIAL_ARG:
            raise Refused(f"the answer takes the factorial of about {n:.3g} (at most {MAX_FACTORIAL_ARG})")
        return n * math.log10(max(n, 1.0))
