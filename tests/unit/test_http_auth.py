"""The shared auth rules of every service's HTTP API (services/common/http.py)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from services.common.config import ConfigError, load_settings
from services.common.http import declare_bearer, needs_token, token_matches
from services.rollout.settings import RolloutSettings


def test_writes_need_the_token_and_reads_only_when_locked() -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert needs_token(method, "/v1/problems", reads_locked=False)
    for method in ("GET", "HEAD"):
        assert not needs_token(method, "/v1/problems", reads_locked=False)
        assert needs_token(method, "/v1/problems", reads_locked=True)
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert not needs_token("GET", path, reads_locked=True)
    assert not needs_token("OPTIONS", "/v1/problems", reads_locked=True)


def test_the_scheme_is_case_insensitive_and_the_token_exact() -> None:
    token = SecretStr("s3cret")
    assert token_matches("Bearer s3cret", token)
    assert token_matches("bEaReR s3cret", token)
    assert not token_matches("Bearer S3CRET", token)
    assert not token_matches("Bearer s3cret2", token)
    assert not token_matches("Basic s3cret", token)
    assert not token_matches("s3cret", token)
    assert not token_matches(None, token)
    assert not token_matches("", token)


def test_the_openapi_marks_exactly_the_guarded_operations() -> None:
    def schema() -> dict:
        return {
            "paths": {
                "/v1/problems": {"get": {"responses": {}}, "post": {"responses": {"201": {}}}},
                "/healthz": {"get": {"responses": {}}},
            }
        }

    open_reads = schema()
    declare_bearer(open_reads, reads_locked=False)
    assert open_reads["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert open_reads["paths"]["/v1/problems"]["post"]["security"] == [{"bearer": []}]
    assert "401" in open_reads["paths"]["/v1/problems"]["post"]["responses"]
    assert "security" not in open_reads["paths"]["/v1/problems"]["get"]
    locked = schema()
    declare_bearer(locked, reads_locked=True)
    assert locked["paths"]["/v1/problems"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in locked["paths"]["/healthz"]["get"]


def test_an_empty_token_is_refused_not_matched_by_an_empty_header() -> None:
    with pytest.raises(ConfigError, match="api_token"):
        load_settings(RolloutSettings, api_token="")
