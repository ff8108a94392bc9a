"""An in-memory engine with vLLM 0.32's RL control API, for weight-update tests on virtual time.

Each token it generates encodes the weights that made it: ``token = 1000 × weights + position``, so a
test can check every segment's version against the tokens themselves. Control calls follow vLLM:
``/pause?mode=abort|keep|wait``, ``/resume``, ``/collective_rpc`` (``reload_weights``),
``/update_weight_version``, ``GET /weight_info``, ``/weight_checker`` (checksum), ``/reset_prefix_cache``.
Aborted requests answer with the tokens so far and finish reason ``abort``, as vLLM does.

Its prefix cache: a call's prompts are cached under its ``cache_salt`` (here the weight version the pool passes,
``salts_prefix_cache``) with the weights that computed them; a later call with the same salt and prompt reuses that
KV — ``stale_hits`` counts reuses of KV computed under other weights than the engine holds now. As in vLLM,
``/reset_prefix_cache`` fails (``{"success": false}``) while any request holds blocks — a ``keep`` update's frozen
calls do (``vllm/v1/core/block_pool.py`` ``reset_prefix_cache``, ``vllm/entrypoints/serve/dev/cache/api_router.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chaos import shared_params
from rollout_plugin.pool.core.engine_client import Generation, Rejected, Unavailable
from rollout_plugin.types import Request, Sample

STEP_S = 0.01  # virtual seconds per token


class VllmLike:
    reports_progress = True
    salts_prefix_cache = True

    def __init__(self, name: str, weights: int = 0, *, dev_mode: bool = True, stream: bool = True,
                 latency_s: float = 0.0):
        self.name = name
        self.latency_s = latency_s  # before a call reaches the engine (network, HTTP parsing)
        self.weights = weights  # what the engine really holds (a folder's number after reload_weights)
        self.version = "default"
        self.dev_mode = dev_mode
        self.stream = stream  # fills the pool's progress as tokens come (vLLM: an SSE call)
        self.dead = False
        self.paused: str | None = None
        self._resumed = asyncio.Event()
        self._abort = asyncio.Event()
        self.generated = 0  # every token it produced, kept or not
        self.calls = 0
        self.folders: dict[str, int] = {}  # path -> weights it holds (the test writes them)
        self.cache: dict[tuple, int] = {}  # (salt, prompt) -> the weights its KV was computed with
        self.stale_hits = 0  # prefixes reused from KV computed under other weights
        self.salts: list[int | None] = []  # each call's weight version (its cache salt)
        self.running = 0  # calls holding KV blocks (frozen ones too)

    # -- data path --------------------------------------------------------------------------------
    async def generate(self, requests: Sequence[Request], progress=None, *, weight_version=None) -> list[Generation]:
        self.calls += 1
        self.salts.append(weight_version)
        shared_params(requests)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        while self.paused is not None:  # a paused vLLM queues new requests until /resume
            await self._resumed.wait()
        self.running += 1
        try:
            self._prefill(requests, weight_version)
            return await self._decode(requests, progress)
        finally:
            self.running -= 1

    def _prefill(self, requests: Sequence[Request], salt) -> None:
        for r in requests:
            key = (salt, tuple(r.prompt))
            if key in self.cache and self.cache[key] != self.weights:
                self.stale_hits += 1
            self.cache[key] = self.weights

    async def _decode(self, requests: Sequence[Request], progress) -> list[Generation]:
        outs = [[[] for _ in range(r.n)] for r in requests]
        budgets = [r.sampling.max_tokens for r in requests]
        base = [len(r.prompt) - 1 for r in requests]  # prompts are [marker, *tokens so far]
        for i, r in enumerate(requests):
            if progress is not None:
                for p in progress[i]:
                    p.prompt_token_ids = list(r.prompt)
        step = 0
        while step < max(budgets):
            await self._gate()
            if self._abort.is_set():
                return self._answer(requests, outs, "abort")
            await asyncio.sleep(STEP_S)
            if self.dead:
                raise Unavailable(f"{self.name}: connection reset")
            for i, b in enumerate(budgets):
                if step < b:
                    for j in range(requests[i].n):
                        token = 1000 * self.weights + base[i] + step
                        outs[i][j].append(token)
                        self.generated += 1
                        if progress is not None and self.stream:
                            progress[i][j].token_ids.append(token)
            step += 1
        return self._answer(requests, outs, "length")

    def _answer(self, requests, outs, finish) -> list[Generation]:
        return [Generation(tuple(Sample("", tuple(t), None, finish) for t in per), len(r.prompt), tuple(r.prompt))
                for r, per in zip(requests, outs)]

    async def _gate(self) -> None:
        while self.paused == "keep":
            await self._resumed.wait()

    async def healthy(self) -> bool:
        return not self.dead

    async def metrics(self) -> str | None:
        return None

    async def aclose(self) -> None:
        pass

    # -- vLLM's RL control API ---------------------------------------------------------------------
    async def admin(self, path: str, body=None, *, timeout_s=None, method: str = "POST"):
        if self.dead:
            raise Unavailable(f"{self.name}: connection refused")
        if not self.dev_mode:
            raise Rejected(f"{self.name}: {method} {path}: 404", status=404)
        body = body or {}
        route, _, query = path.partition("?")
        if route == "/pause":
            mode = dict(kv.split("=") for kv in query.split("&") if kv).get("mode", "abort")
            self.paused = mode
            self._resumed.clear()
            if mode == "abort":
                self._abort.set()
                await asyncio.sleep(0)  # the aborted calls answer
            return {"status": "paused"}
        if route == "/resume":
            self.paused = None
            self._abort.clear()
            self._resumed.set()
            return {"status": "resumed"}
        if route == "/collective_rpc" and body.get("method") == "reload_weights":
            self.weights = self.folders[body["kwargs"]["weights_path"]]
            return {"results": [None]}
        if route == "/reset_prefix_cache":
            if self.running:  # blocks still held: vLLM refuses the reset
                return {"success": False}
            self.cache.clear()
            return {"success": True}
        if route == "/update_weight_version":
            self.version = body["new_version"]
            return {"success": True, "new_version": self.version}
        if route == "/weight_info":
            return {"weight_version": self.version}
        if route == "/weight_checker":
            return {"checksums": {"model.weight": f"sha-{self.weights}"}}
        raise Rejected(f"{self.name}: {method} {path}: 404", status=404)
