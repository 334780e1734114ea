"""The verifier's request bounds agree with each other and with what the client sends."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.verifier_client import MAX_ROWS, SENT_ANSWER_CHARS
from services.verifier import guard
from services.verifier.settings import VerifierSettings
from services.verifier.verify_api import MAX_ANSWER_CHARS


def test_the_client_sends_all_the_verifier_reads_and_no_more_than_it_takes() -> None:
    assert guard.TAIL_CHARS <= SENT_ANSWER_CHARS <= MAX_ANSWER_CHARS
    # a full request of the longest completions the client sends, in ASCII, fits the body limit
    assert VerifierSettings().max_body_bytes > MAX_ROWS * (SENT_ANSWER_CHARS + 100)


def test_a_request_deadline_must_leave_time_for_an_answer_at_its_limit() -> None:
    with pytest.raises(ValidationError, match="verify_deadline_s"):
        VerifierSettings(timeout_s=10, verify_deadline_s=8)
    assert VerifierSettings(timeout_s=5, verify_deadline_s=8).verify_deadline_s == 8
