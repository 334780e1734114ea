"""The one client every service uses to talk to an inference engine (SGLang or the CPU
engine; it cannot tell which, by design: DESIGN.md 3).

    async with EngineClient("http://127.0.0.1:30000") as engine:
        outs = await engine.generate([[1, 2, 3]], SamplingParams(n=8, max_new_tokens=512,
                                                                  temperature=0.8, sampling_seed=1))
        outs[0].logprobs, outs[0].finish_reason, outs[0].weight_version   # typed

Requests retry on a failed connection and on 503 (an engine restarting or loading), with
jittered backoff, up to ``retries`` times; any other error raises ``EngineError`` at once
with the engine's message. A ``/generate`` whose answer is lost after it was sent (a read
timeout, a dropped connection) is never sent again, since the engine may still be decoding
it: the client aborts each of its rows by its rid and raises ``EngineError``, and the
caller redoes the work under the same id (the scheduler replans the step). The other calls
are idempotent and also retry on those errors. Nothing but ``EngineError`` ever leaves this
client. Weight versions are (step, lineage) ints here; the engine speaks their names,
``"12"`` or ``"12@3"`` (services.common.messages.version_name).

The contract is SGLang ``SGLANG_VERSION``'s own server (tests/integration/test_sglang_contract.py
reads the wheel's http_server.py and io_struct.py): every path called is routed there with
the method used, none is one it marks deprecated (``/model_info``, not ``/get_model_info``),
and every body built here (the ``*_payload`` builders, public so the tests check exactly
what is sent) holds only fields of the route's request structure, with their types.

Auth, as SGLang 0.5.23 decides it (sglang/srt/utils/auth.py): ``api_key`` (its
``--api-key``) goes with the ordinary calls (``/generate``, ``/model_info``), and with the
control calls too unless the engine also has ``--admin-api-key``: then the control calls,
the ones it marks ``AuthLevel.ADMIN_OPTIONAL`` (weight updates and sync, pause, continue,
abort), carry ``admin_key`` instead, and the api key no longer opens them. Health,
readiness and metrics are open.

Call sequence of a weight update: SGLang's ``/update_weights_from_disk`` restores the
weights for loading and post-processes them itself (its runner's disk update calls
``restore_weights_before_loading`` and ``load_weights_and_postprocess``), so it is one call
here, never wrapped. ``/begin_weight_update`` ... ``/end_weight_update`` bracket the
distributed and tensor updates, which refuse to run outside such a session. The contract
test fails when the pinned release changes either rule.

Broadcast weight sync (services/trainer/broadcast.py drives it): ``init_weights_update_group``
once per engine, then per update ``begin_weight_update``, one ``update_weights_from_distributed``
per flattened bucket (each answered only once rank 0's broadcast of that bucket arrived),
``end_weight_update``; ``destroy_weights_update_group`` at the end. These calls are sent
once, never retried (a second init or a second receive would wait on a broadcast nobody
sends), each under its own ``timeout_s``, and a refusal (SGLang answers 400 with
``{"success": false, "message"}``) raises ``EngineError``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from services.common import messages, retry
from services.common.messages import FinishReason

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
"""The SGLang release this client is written against: the one version of the project.
The tests read this release's wheel (its server and request structures are the contract)
and docker-compose.yml and the Kubernetes gpu overlay run its image (tests/deploy checks)."""


REFUSALS = frozenset({400, 404, 409})
"""How an engine refuses a weight update or sync call with ``{"success": false, "message"}``:
SGLang with 400 always; the CPU engine with 404 for a path or group it lacks and 409 for a
call that came at the wrong time (services/engine/weight_sync.py)."""


class EngineError(RuntimeError):
    """The engine refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SamplingParams(BaseModel):
    """The sampling parameters this system sends (SGLang's names; None fields are omitted).

    ``n`` copies of a prompt are sent as ``n`` rows of a batch, copy j seeded with
    ``sampling_seed + j`` (a random seed when None), never as SGLang's ``n``
    (``EngineClient.generate_payload``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = None
    n: int = Field(1, ge=1)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    sampling_seed: int | None = None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Finish(_Loose):
    """``finish_reason``: {type: stop, matched} | {type: length, length} | {type: abort, message}."""

    type: Literal["stop", "length", "abort"]
    matched: int | str | list[int] | None = None
    length: int | None = None
    message: str | None = None


class Span(_Loose):
    """One of ``meta_info.weight_versions``: output tokens ``[start, end)`` came from ``version``."""

    version: str
    start: int
    end: int


class MetaInfo(_Loose):
    id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Finish | None = None
    output_token_logprobs: list[tuple[float | None, int, str | None]] | None = None
    weight_version: str | None = None
    """SGLang names here the weights that made the *last* token (its last span)."""
    weight_versions: list[Span] | None = None
    """Which weights made which tokens, oldest first (SGLang 0.5.23 reports it for every
    finished request; more than one span after an update while the request ran)."""
    e2e_latency: float | None = None


class GenerateOutput(_Loose):
    """One sequence of a /generate answer."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo

    @property
    def logprobs(self) -> list[float]:
        """Sampling logprob of each output token (needs return_logprob)."""
        entries = self.meta_info.output_token_logprobs
        if entries is None:
            raise EngineError("the engine returned no output_token_logprobs (was return_logprob set?)")
        return [float(lp) if lp is not None else float("nan") for lp, _tok, _text in entries]

    @property
    def finish_reason(self) -> FinishReason:
        fr = self.meta_info.finish_reason
        return FinishReason(fr.type) if fr is not None else FinishReason.ABORT

    @property
    def version_spans(self) -> list[messages.VersionSpan]:
        """Which weights (step, lineage) made which tokens, oldest first; one span when the
        weights did not change while it ran (no ``weight_versions``: the one of
        ``weight_version``)."""
        spans = self.meta_info.weight_versions or [
            Span(version=self.meta_info.weight_version or "0", start=0, end=len(self.output_ids))
        ]
        out = []
        for span in spans:
            step, lineage = parse_version(span.version)
            out.append(messages.VersionSpan(step=step, lineage=lineage, start=span.start, end=span.end))
        return out

    @property
    def weight_version(self) -> int:
        """The step of the oldest weights that sampled it (staleness is judged by it)."""
        return self.version_spans[0].step

    @property
    def lineage(self) -> int:
        """The lineage of those weights."""
        return self.version_spans[0].lineage


class ModelInfo(_Loose):
    model_path: str
    is_generation: bool = True
    weight_version: str | None = None

    @property
    def version(self) -> int:
        return self.served[0]

    @property
    def served(self) -> tuple[int, int]:
        """(step, lineage) of the weights being served."""
        return parse_version(self.weight_version)


def parse_version(value: str | None) -> tuple[int, int]:
    """(step, lineage) of an engine's weight version name ("0" at start, "12@3")."""
    try:
        return messages.parse_version(value)
    except ValueError as exc:
        raise EngineError(f"engine weight_version {value!r} is not '<step>' or '<step>@<lineage>'") from exc


class EngineClient(retry.RetryingClient):
    """Async client for the engine's native API; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 0.5,
        api_key: str | None = None,
        admin_key: str | None = None,
        rows_apart: bool = False,
        abort_lost: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``rows_apart``: send each row of a generation as a request of its own, for SGLang's
        router, which takes one ``sampling_params`` object and one rid per request (a row's
        own seed and rid would not pass it as a batch). ``abort_lost(rid)``: how a row whose
        answer was lost is aborted (True if it was), where this client's own
        ``/abort_request`` would reach no engine (a router routes no control call).
        ``admin_key``: sent instead of ``api_key`` on the control calls (module docstring)."""
        super().__init__(base_url, timeout=timeout, retries=retries, backoff=backoff, token=api_key)
        self._admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else None
        self.rows_apart = rows_apart
        self._abort_lost = abort_lost

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        ok_400: bool = False,
        on_lost: Callable[[], Awaitable[None]] | None = None,
        retries: int | None = None,
        admin: bool = False,
    ) -> httpx.Response:
        """``ok_400``: a refusal (REFUSALS) is an answer to read, not an error to raise.
        ``admin``: a control call (SGLang's ADMIN_OPTIONAL), sent with the admin key if any."""

        def accept(resp: httpx.Response) -> bool:
            return resp.status_code < 400 or (ok_400 and resp.status_code in REFUSALS)

        return await retry.request(
            self._http,
            method,
            path,
            json,
            peer=f"the engine at {self.base_url}",
            retries=self.retries if retries is None else retries,
            backoff=self.backoff,
            fail=EngineError,
            accept=accept,
            on_lost=on_lost,
            headers=self._admin if admin else None,
        )

    @staticmethod
    def generate_payload(
        input_ids: list[list[int]], params: SamplingParams, *, return_logprob: bool = True, rid: str | None = None
    ) -> dict[str, Any]:
        """The /generate request body (public so contract tests can check exactly what is sent).

        Every copy of every prompt is a row of one batch with ``n = 1``: copy j of a prompt
        has seed ``sampling_seed + j`` and row k is named ``<rid>-<k>``. SGLang's own ``n``
        would give the copies one seed, so under ``--enable-deterministic-inference`` a
        group would be one sample n times, and fresh rids, so none could be aborted; a
        batch with a list of rids and one sampling_params per row keeps both. Without a
        seed one is drawn here: SGLang's deterministic mode seeds every unseeded row with 42.
        """
        seed = params.sampling_seed if params.sampling_seed is not None else secrets.randbelow(2**31)
        copies = [
            params.model_copy(update={"n": 1, "sampling_seed": seed + j}).model_dump(exclude_none=True)
            for j in range(params.n)
        ]
        body: dict[str, Any] = {
            "input_ids": [ids for ids in input_ids for _ in range(params.n)],
            "sampling_params": copies * len(input_ids),
            "return_logprob": return_logprob,
        }
        if rid is not None:
            body["rid"] = [f"{rid}-{k}" for k in range(len(body["input_ids"]))]
        return body

    async def generate(
        self,
        input_ids: list[list[int]],
        params: SamplingParams,
        *,
        return_logprob: bool = True,
        rid: str | None = None,
    ) -> list[GenerateOutput]:
        """Sample ``params.n`` completions of each prompt, each its own row with its own seed
        (``generate_payload``); results are ordered by prompt, then copy.

        ``rid`` names the request on the engine (one is made up when none is given), so that
        a request whose answer was lost can be aborted there (see the module docstring).
        """
        if not input_ids:
            return []
        rid = rid or uuid.uuid4().hex
        body = self.generate_payload(input_ids, params, return_logprob=return_logprob, rid=rid)
        expected = len(input_ids) * params.n
        if self.rows_apart:  # the first row to fail cancels the others (so their engines abort them)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._generate(row, [row["rid"]], rid, 1)) for row in self.row_payloads(body)
                    ]
            except* EngineError as failed:
                raise failed.exceptions[0] from None
            return [out for task in tasks for out in task.result()]
        return await self._generate(body, body["rid"], rid, expected)

    @staticmethod
    def row_payloads(body: dict[str, Any]) -> list[dict[str, Any]]:
        """``generate_payload``'s batch as one request per row (``rows_apart``): each row
        its own ``input_ids``, ``sampling_params`` object and rid, as SGLang's router takes them."""
        return [
            {**body, "input_ids": ids, "sampling_params": sampling, "rid": one}
            for ids, sampling, one in zip(body["input_ids"], body["sampling_params"], body["rid"], strict=True)
        ]

    async def _abort_one(self, one: str) -> bool:
        try:
            if self._abort_lost is not None:
                return await self._abort_lost(one)
            await self.abort(one)
        except EngineError as exc:  # the generation fails below either way
            log.warning("could not abort the lost request %s: %s", one, exc)
            return False
        return True

    async def _generate(self, body: dict[str, Any], rids: list[str], rid: str, expected: int) -> list[GenerateOutput]:
        async def abort_lost() -> None:
            # Each row by its rid, as sent: SGLang (0.5.23) keeps the rids of a batch of n = 1
            # rows (io_struct._normalize_rid), and so does the CPU engine. Both match an abort
            # by prefix, so "<rid>-1" also stops "<rid>-10": rows of this same request. At
            # once, so an engine that went away costs one retry loop, not one per row.
            done = await asyncio.gather(*(self._abort_one(one) for one in rids))
            if any(done):
                log.warning(
                    "aborted %d of the %d rows of the lost request %s on the engine at %s",
                    sum(done),
                    len(rids),
                    rid,
                    self.base_url,
                )

        resp = await self._request("POST", "/generate", body, on_lost=abort_lost)
        data = resp.json()
        rows = data if isinstance(data, list) else [data]
        if len(rows) != expected:
            raise EngineError(f"engine returned {len(rows)} outputs for {expected} requested")
        return [GenerateOutput.model_validate(r) for r in rows]

    @staticmethod
    def update_weights_payload(
        model_path: str, weight_version: int, *, lineage: int = 0, abort_all_requests: bool = False
    ) -> dict[str, Any]:
        """The /update_weights_from_disk body: the model directory, the name of the version
        it is served as ("12", "12@3"), and whether requests in flight are aborted rather
        than waited for. SGLang's other defaults stand: the cache is flushed after the load."""
        return {
            "model_path": model_path,
            "weight_version": messages.version_name(weight_version, lineage),
            "abort_all_requests": abort_all_requests,
        }

    async def update_weights_from_disk(
        self, model_path: str, weight_version: int, *, lineage: int = 0, abort_all_requests: bool = False
    ) -> str:
        body = self.update_weights_payload(
            model_path, weight_version, lineage=lineage, abort_all_requests=abort_all_requests
        )
        resp = await self._request("POST", "/update_weights_from_disk", body, ok_400=True, admin=True)
        data = resp.json()
        if resp.status_code in REFUSALS or not data.get("success"):
            name = body["weight_version"]
            raise EngineError(f"weight update to version {name} failed: {data.get('message')}", resp.status_code)
        return str(data.get("message", ""))

    async def model_info(self) -> ModelInfo:
        resp = await self._request("GET", "/model_info")
        return ModelInfo.model_validate(resp.json())

    async def weight_version(self) -> int:
        """The step of the weights being served (``served_version`` has their lineage too)."""
        return (await self.model_info()).version

    async def served_version(self) -> tuple[int, int]:
        """(step, lineage) of the weights being served."""
        return (await self.model_info()).served

    async def ready(self) -> bool | None:
        """SGLang's ``GET /ready``: True when the engine has started and is not paused, False
        when it answers 503 (paused, say: an engine someone else left paused, while
        ``healthy`` says True), None when it cannot tell (no answer, no such route)."""
        try:
            resp = await self._http.get("/ready", timeout=5.0)
        except httpx.HTTPError:
            return None
        return {200: True, 503: False}.get(resp.status_code)

    async def healthy(self) -> bool:
        try:
            resp = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    @staticmethod
    def pause_payload(mode: Literal["abort", "in_place", "retract"] = "abort") -> dict[str, Any]:
        """The /pause_generation body."""
        return {"mode": mode}

    async def pause(self, mode: Literal["abort", "in_place", "retract"] = "abort") -> None:
        await self._request("POST", "/pause_generation", self.pause_payload(mode), admin=True)

    @staticmethod
    def resume_payload() -> dict[str, Any]:
        """The /continue_generation body: empty, but a JSON object (SGLang's route requires
        a body, and its defaults stand)."""
        return {}

    async def resume(self) -> None:
        await self._request("POST", "/continue_generation", self.resume_payload(), admin=True)

    @staticmethod
    def abort_payload(rid: str | None = None, *, abort_all: bool = False) -> dict[str, Any]:
        """The /abort_request body (public so contract tests can check exactly what is sent)."""
        return {"rid": rid or "", "abort_all": abort_all}

    async def abort(self, rid: str | None = None, *, abort_all: bool = False) -> None:
        await self._request("POST", "/abort_request", self.abort_payload(rid, abort_all=abort_all), admin=True)

    # Broadcast weight sync: each call sent once, under its own timeout.
    async def _sync_call(self, path: str, body: dict[str, Any], timeout_s: float) -> str:
        """POST ``body`` once; the engine's message, or EngineError (refused, or no answer in time)."""

        async def call() -> httpx.Response:
            return await self._request("POST", path, body, ok_400=True, retries=0, admin=True)

        try:
            resp = await asyncio.wait_for(call(), timeout_s)
        except TimeoutError:
            raise EngineError(f"POST {path}: no answer from the engine at {self.base_url} in {timeout_s:g}s") from None
        data = resp.json()
        if resp.status_code in REFUSALS or not data.get("success"):
            raise EngineError(f"POST {path} failed at {self.base_url}: {data.get('message')}", resp.status_code)
        return str(data.get("message", ""))

    @staticmethod
    def init_weights_update_group_payload(
        master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> dict[str, Any]:
        """The /init_weights_update_group body: the store rank 0 hosts, this engine's first
        rank in the group, the group's size and name, and the collective backend ("nccl"
        for SGLang on GPUs, "gloo" for the CPU engine)."""
        return {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        *,
        backend: str = "gloo",
        timeout_s: float = 120.0,
    ) -> str:
        """Answered once every rank joined the group: rank 0 must be joining meanwhile."""
        body = self.init_weights_update_group_payload(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )
        return await self._sync_call("/init_weights_update_group", body, timeout_s)

    @staticmethod
    def update_weights_from_distributed_payload(
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        *,
        weight_version: int | None = None,
        lineage: int = 0,
        flattened: bool = True,
    ) -> dict[str, Any]:
        """The /update_weights_from_distributed body of one broadcast: its tensors in order
        (dtype names as torch spells them, "float32"), the group, SGLang's "flattened_bucket"
        format (one uint8 tensor of them end to end) or one broadcast per tensor, and the
        version name, on the last call of an update only (the version then names all of it)."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        if flattened:
            body["load_format"] = "flattened_bucket"
        if weight_version is not None:
            body["weight_version"] = messages.version_name(weight_version, lineage)
        return body

    async def update_weights_from_distributed(self, body: dict[str, Any], *, timeout_s: float = 120.0) -> str:
        """Send one ``update_weights_from_distributed_payload``; answered once the broadcast
        it describes has arrived and was loaded."""
        return await self._sync_call("/update_weights_from_distributed", body, timeout_s)

    @staticmethod
    def begin_weight_update_payload() -> dict[str, Any]:
        """The /begin_weight_update body: SGLang's defaults (every runner)."""
        return {"selector": "all"}

    async def begin_weight_update(self, *, timeout_s: float = 30.0) -> str:
        return await self._sync_call("/begin_weight_update", self.begin_weight_update_payload(), timeout_s)

    @staticmethod
    def end_weight_update_payload() -> dict[str, Any]:
        """The /end_weight_update body: empty, a JSON object."""
        return {}

    async def end_weight_update(self, *, timeout_s: float = 30.0) -> str:
        return await self._sync_call("/end_weight_update", self.end_weight_update_payload(), timeout_s)

    @staticmethod
    def destroy_weights_update_group_payload(group_name: str) -> dict[str, Any]:
        """The /destroy_weights_update_group body."""
        return {"group_name": group_name}

    async def destroy_weights_update_group(self, group_name: str, *, timeout_s: float = 30.0) -> str:
        body = self.destroy_weights_update_group_payload(group_name)
        return await self._sync_call("/destroy_weights_update_group", body, timeout_s)
