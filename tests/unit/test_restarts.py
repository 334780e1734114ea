"""`pope up`'s supervision as pure logic: the restart backoff, the crash-loop window, how a
death is told, and how the progress loop reads a /v1/status answer (services/restarts.py,
services/up.py). The processes themselves: tests/e2e/test_pope_up_supervision.py."""

from __future__ import annotations

import signal

import httpx
import pytest

from services.restarts import Deaths, RestartPolicy, exit_text
from services.up import read_status

MID = 0.5  # the random draw that lands on the backoff itself (no jitter)


def test_the_backoff_doubles_from_one_second_to_thirty() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n, MID) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_jitter_stays_within_its_fraction() -> None:
    policy = RestartPolicy(jitter=0.2)
    assert policy.delay(3, 0.0) == pytest.approx(3.2) and policy.delay(3, 0.999999) == pytest.approx(4.8)
    assert policy.delay(10, 0.0) == pytest.approx(24.0)  # around the ceiling too


def test_deaths_back_off_until_a_crash_loop() -> None:
    deaths = Deaths(RestartPolicy(crash_loop_deaths=5, crash_loop_window_s=120))
    # Four quick deaths: 1, 2, 4, 8 s of backoff; the fifth within the window stops it.
    delays = [deaths.record(at, ran_s=2, rand=MID) for at in (10, 20, 30, 40)]
    assert delays == [1, 2, 4, 8]
    assert deaths.record(50, ran_s=2, rand=MID) is None


def test_deaths_that_fall_out_of_the_window_no_longer_count() -> None:
    deaths = Deaths(RestartPolicy(crash_loop_deaths=3, crash_loop_window_s=60))
    assert deaths.record(0, ran_s=1, rand=MID) == 1
    assert deaths.record(50, ran_s=1, rand=MID) == 2
    assert deaths.record(100, ran_s=1, rand=MID) == 4  # the death at 0 is out of [40, 100]
    assert deaths.record(105, ran_s=1, rand=MID) is None  # 50, 100, 105


def test_a_child_that_ran_a_while_starts_its_backoff_over() -> None:
    deaths = Deaths(RestartPolicy(reset_after_s=60, crash_loop_window_s=10))
    assert [deaths.record(at, ran_s=1, rand=MID) for at in (0, 20, 40)] == [1, 2, 4]
    assert deaths.record(200, ran_s=90, rand=MID) == 1  # healthy for 90 s before it died
    assert deaths.record(210, ran_s=1, rand=MID) == 2


def test_an_exit_is_told_by_status_or_signal() -> None:
    assert exit_text(1) == "exit status 1"
    assert exit_text(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_text(-200) == "killed by signal 200"


def test_a_status_answer_without_a_body_is_a_reason_to_wait() -> None:
    url = "http://rollout/v1/status"

    def answer(code: int, text: str) -> httpx.Response:
        return httpx.Response(code, text=text, request=httpx.Request("GET", url))

    assert read_status(answer(200, '{"trainer": {"version": 3}}')) == {"trainer": {"version": 3}}
    assert read_status(answer(500, "Internal Server Error")) == "500 Internal Server Error"  # Redis down
    assert read_status(answer(503, "")) == "503 Service Unavailable"
    assert "not JSON" in str(read_status(answer(200, "<html>proxy</html>")))
    assert "not a JSON object" in str(read_status(answer(200, "[1, 2]")))
