"""The client of SGLang's router (``sglang-router``, pinned as ``ROUTER_VERSION``) for its
worker list: the trainer's fleet keeps the router's workers to the engines that serve
its weights (services/trainer/fleet.py).

    async with RouterClient("http://127.0.0.1:30000") as router:
        await router.workers()                 # {engine url: worker id}
        await router.add("http://10.0.0.5:30000")
        await router.remove("http://10.0.0.5:30000")

As the pinned router has them (checked against it in tests/integration/test_router.py):
``GET /workers`` lists ``{"workers": [{"id", "url", "is_healthy", ...}]}``; ``POST /workers``
``{"url": ...}`` answers 202 and adds the worker in the background, after fetching its
``/model_info`` and ``/server_info`` (a worker that does not answer is never added, with no
error to the caller: ``add`` therefore waits until the list holds it, or raises);
``DELETE /workers/{id}`` takes the worker's id (a UUID, not its url), answers 202 and
removes it in the background (``remove`` waits for that too).
The router does not route control calls (``/abort_request`` is a 404 there, and its
``/model_info`` answers for one engine of its choice): those go to each engine directly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.common import retry

ROUTER_VERSION = "0.3.2"
"""The sglang-router release the project runs (pip install sglang-router==ROUTER_VERSION)."""

ADD_WITHIN_S = 10.0
"""How long ``add`` waits for the router's background job to list the worker."""


class RouterError(RuntimeError):
    """The router refused a call or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RouterClient(retry.RetryingClient):
    """Async client of the router's worker API; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        admin_key: str | None = None,
    ) -> None:
        """``admin_key``: the router's control-plane key (``POPE_ROUTER_ADMIN_KEY``), if it has one."""
        super().__init__(base_url, timeout=timeout, retries=retries, backoff=backoff, token=admin_key)

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        resp = await retry.request(
            self._http,
            method,
            path,
            json,
            peer=f"the router at {self.base_url}",
            retries=self.retries,
            backoff=self.backoff,
            fail=RouterError,
        )
        return resp.json() if resp.content else None

    async def workers(self) -> dict[str, str]:
        """Each worker's url -> its id."""
        data = await self._call("GET", "/workers")
        return {w["url"]: w["id"] for w in data.get("workers", [])}

    @staticmethod
    def add_payload(url: str, api_key: str | None = None) -> dict[str, Any]:
        """The POST /workers body: the worker's url, and the key the router must send it."""
        return {"url": url, **({"api_key": api_key} if api_key else {})}

    async def add(self, url: str, api_key: str | None = None, within_s: float = ADD_WITHIN_S) -> None:
        """Add ``url`` and wait until the router lists it (RouterError if it does not
        within ``within_s``: the router could not reach the engine)."""
        if url in await self.workers():
            return
        await self._call("POST", "/workers", self.add_payload(url, api_key))
        deadline = time.monotonic() + within_s
        while url not in await self.workers():
            if time.monotonic() > deadline:
                raise RouterError(f"the router at {self.base_url} did not add {url} within {within_s:.0f}s")
            await asyncio.sleep(0.1)

    async def remove(self, url: str, within_s: float = ADD_WITHIN_S) -> None:
        """Take ``url`` out of the router (nothing if it is not a worker there) and wait
        until the router no longer lists it."""
        worker = (await self.workers()).get(url)
        if worker is None:
            return
        await self._call("DELETE", f"/workers/{worker}")
        deadline = time.monotonic() + within_s
        while url in await self.workers():
            if time.monotonic() > deadline:
                raise RouterError(f"the router at {self.base_url} did not remove {url} within {within_s:.0f}s")
            await asyncio.sleep(0.1)
