"""The guard (services/verifier/guard.py): what it refuses, what it lets through unchanged."""

from __future__ import annotations

import pytest

from services.verifier import guard
from services.verifier.guard import Refused, screen, screen_gold
from services.verifier.scoring import last_boxed
from tests.unit.test_scoring import CASES

# Answers in the forms real ones take, up to the limits: none may be refused.
REAL = [
    "\\boxed{\\frac{\\sqrt{3}}{2}}",
    "\\boxed{\\left(\\frac{1}{2}, \\frac{3}{4}\\right]}",
    "\\boxed{2^{2024} - 1}",
    "\\boxed{e^{x^{2}}}",
    "\\boxed{2^{2^{2^{2}}}}",
    "\\boxed{10^{10^{6}}}",
    "\\boxed{(x+1)^{499}}",
    "\\boxed{(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)}",
    "\\boxed{10000!}",
    "\\boxed{\\binom{2024}{2}}",
    "\\boxed{\\sum_{k=1}^{100} k^2}",
    "\\boxed{\\prod_{k=1}^{n} k}",
    "\\boxed{\\lambda + \\pi}",
    "\\boxed{" + "9" * 400 + "}",
    "The answer is " + "9" * 1000,
    "\\boxed{\\frac{1}{1+\\frac{1}{1+\\frac{1}{1+\\frac{1}{2}}}}}",
    "It is important to note that 3 + 4 = 7, so the answer is $7$.",
    "We compute 1.5 * 2 = 3. Final answer: 3",
]


@pytest.mark.parametrize("completion", REAL + [c for c, _gold, _correct in CASES])
def test_real_answers_pass_unchanged(completion: str) -> None:
    assert screen(completion, last_boxed) == completion


@pytest.mark.parametrize("gold", [gold for _c, gold, _correct in CASES])
def test_real_gold_answers_pass(gold: str) -> None:
    assert screen_gold(gold) == gold


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("\\boxed{9^{9^{9}}}", "exponent of about 3.87e+08"),
        ("\\boxed{10^{10^{100}}}", "exponent of about 1e+100"),
        ("\\boxed{2^{2^{2^{2^{2}}}}}", "nests exponents"),
        ("So 9^9^9^9", "exponent"),
        ("The answer is 9**9**9", "exponent"),
        ("$" + "x^" * 300 + "2$", "nests exponents"),
        ("\\boxed{" + "{" * 9 + "1" + "}" * 9 + "}", "brackets 9 deep"),
        ("The answer is " + "(" * 5000, "brackets 5000 deep"),
        ("\\boxed{1" + "0" * 1000 + "}", "over 500 characters"),
        ("The answer is 1" + "0" * 1000, "integer of 1001 digits"),
        ("\\boxed{1000000!}", "factorial of about 1e+06"),
        ("\\boxed{(10^{10})!}", "factorial"),
        ("\\boxed{10!!}", "factorial of about 1e+10"),  # (10!)!, 10! over-estimated
        ("\\boxed{\\binom{10^9}{5*10^8}}", "factorial of about 1e+09"),
        ("\\boxed{\\prod_{n=1}^{10^{7}} n}", "sum or product of 1e+07 terms"),
        ("\\boxed{\\sum_{k=0}^{1000} \\binom{1000}{k} x^k}", "sum or product of 1e+03 terms"),
        ("\\boxed{(x+1)^{500}}", "expands to over 500 terms"),
        ("\\boxed{(x+1)^{100}(y+1)^{100}}", "expands to over 500 terms"),
        ("\\boxed{\\int_0^1 e^{x^{3}}\\,dx}", "integral"),
        ("\\def\\a{\\a\\a}\\a", "macros"),
        ("\\newcommand{\\three}{3}\\boxed{\\three}", "macros"),
        ("\\boxed{\\let\\a\\b 3}", "macros"),
        ("\\boxed{__import__('os').system('true')}", "Python"),
        ("\\boxed{(lambda: 1)()}", "Python"),
        ("Answer: eval('1')", "Python"),
        ("\\binom" * 5000, "too deeply"),
    ],
)
def test_refused(completion: str, reason: str) -> None:
    with pytest.raises(Refused, match=reason.replace("+", r"\+").replace("(", r"\(")):
        screen(completion, last_boxed)


def test_a_refusal_carries_the_answer() -> None:
    with pytest.raises(Refused) as info:
        screen("so \\boxed{9^{9^{9}}}", last_boxed)
    assert info.value.extracted == "9^{9^{9}}"
    with pytest.raises(Refused) as info:
        screen("\\boxed{" + "1" * 5000 + "}", last_boxed)
    assert info.value.extracted == "1" * guard.MAX_ANSWER_CHARS


def test_invisible_and_control_characters_are_removed_look_alikes_kept() -> None:
    assert screen("\x1b[31m\\b\x00oxed{1\u200b2}\ufeff\x1b[0m", last_boxed) == "[31m\\boxed{12}[0m"
    assert screen("\\boxed{\u202e21}", last_boxed) == "\\boxed{21}"  # shown as 12, says 21
    assert screen("\\boxed{\u0445+\uff15}\n\t", last_boxed) == "\\boxed{\u0445+\uff15}\n\t"


def test_only_the_tail_of_a_long_completion_is_read() -> None:
    junk = "\\boxed{9^{9^{9}}} " + "thinking " * 10_000
    assert screen(junk + "\\boxed{7}", last_boxed).endswith("\\boxed{7}")
    assert len(screen(junk, last_boxed)) == guard.TAIL_CHARS


def test_a_tower_in_the_prose_does_not_refuse_a_clean_box() -> None:
    text = "First $9^{9^{9^{9}}}$, far too big; eval(x) is no help. So \\boxed{4}"
    assert screen(text, last_boxed) == text


def test_the_slow_answer_the_pool_tests_use_gets_past_the_guard() -> None:
    """tests/integration/test_verifier_pool.py needs an answer that genuinely takes long."""
    from tests.integration.test_verifier_pool import SLOW

    assert screen(SLOW, last_boxed) == SLOW
