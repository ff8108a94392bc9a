"""The engine-client interface over a simulated engine: the real pool talks to it as to vLLM.

Lengths come from the request: ``metadata["sim_prompt_tokens"]`` (int) and
``metadata["sim_output_tokens"]`` (one length per sample, ``n`` of them); what a real engine
decides by sampling, the workload decides up front, so every policy generates the same tokens.
A dead engine fails its calls as a dropped connection does (retryable, suspect), answers
``healthy()`` with False and serves no ``/metrics``.

Pieces of a group (a split group, samples generated again) and continued samples: a simulated sample's
first token id is its length (what the engine "decided" when it started), so a sample continued from its
tokens (prompt + tokens as the prompt, as the pool sends it) runs to the same length; samples that got no
token before an abort go back to their group's bag (``groups``, shared by a run's clients), from which a
piece of ``n`` < k samples draws. The control endpoints a weight update uses (vLLM dev mode's ``/pause``,
``/resume``, ``/collective_rpc`` reload, ``/reset_prefix_cache``, ``/update_weight_version``,
``/weight_info``) act on the simulated engine; a reload takes the profile's weight-transfer time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import cache
from typing import Any
from urllib.parse import parse_qs

from rollout_plugin.pool.core.engine_client import Generation, Progress, Rejected, Unavailable
from rollout_plugin.pool.observe.telemetry import EngineMetrics
from rollout_plugin.sim.engine import CachedPrompt, EngineDied, SimCall, SimEngine
from rollout_plugin.sim.prefix_cache import PrefixCache
from rollout_plugin.types import Request, Sample

PROMPT_KEY = "sim_prompt_tokens"
OUTPUT_KEY = "sim_output_tokens"
# What the prompt's tokens are, as prefix_cache.Content segments (the prefix cache's block identities); a
# request without it is never a prefix-cache hit.
CONTENT_KEY = "sim_prompt_content"

log = logging.getLogger(__name__)


@cache
def _sample(length: int) -> Sample:
    # Samples are immutable: one shared instance per length keeps 10⁶ results cheap. Its first token id is
    # its length: a continued sample says how long it is to run.
    return Sample(text="", token_ids=((length,) + (0,) * (length - 1)) if length else (), finish_reason="length")


@cache
def _zeros(n: int) -> tuple[int, ...]:
    return (0,) * n


def _cut(target: int, done: int, first: bool) -> Sample:
    """What an aborted sample had: ``done`` tokens (its first one its length, if it is the sample's first)."""
    ids = ((target,) + _zeros(done - 1)) if first and done else _zeros(done)
    return Sample(text="", token_ids=ids, finish_reason="abort")


def metrics_text(m: EngineMetrics, model: str = "sim", block_size: int = 16) -> str:
    """What vLLM's ``/metrics`` would say (the few series :func:`parse_vllm_metrics` reads)."""
    lab = f'{{model_name="{model}"}}'
    return "\n".join([
        f"vllm:num_requests_running{lab} {m.running}",
        f"vllm:num_requests_waiting{lab} {m.waiting}",
        f"vllm:kv_cache_usage_perc{lab} {m.kv_usage}",
        f"vllm:num_preemptions_total{lab} {m.preemptions_total}",
        f"vllm:generation_tokens_total{lab} {m.generation_tokens_total}",
        f"vllm:prompt_tokens_total{lab} {m.prompt_tokens_total}",
        f'vllm:cache_config_info{{block_size="{block_size}",num_gpu_blocks="{(m.kv_tokens or 0) // block_size}"}} 1.0',
        f"vllm:iteration_tokens_total_sum{lab} {m.step_tokens_sum}",
        f"vllm:iteration_tokens_total_count{lab} {m.steps_total}",
        f"vllm:inter_token_latency_seconds_sum{lab} {m.itl_sum}",
        f"vllm:inter_token_latency_seconds_count{lab} {m.itl_count}",
        "",
    ])


class MetricsText(str):
    """Prometheus text that also carries what it says, parsed: the simulator's monitor reads
    ``.parsed`` instead of re-parsing 10³ texts a second (a test checks the two agree)."""

    parsed: EngineMetrics


def _metrics_text(m: EngineMetrics, block_size: int, cache: PrefixCache | None = None) -> MetricsText:
    body = metrics_text(m, block_size=block_size)
    if cache is not None:  # vLLM's counters of new requests' prompt tokens looked up and found (metrics/loggers.py)
        body += (f'vllm:prefix_cache_queries_total{{model_name="sim"}} {float(cache.queries)}\n'
                 f'vllm:prefix_cache_hits_total{{model_name="sim"}} {float(cache.hits)}\n')
    text = MetricsText(body)
    text.parsed = m
    return text


def _report(engine: SimEngine, specs: Sequence[_Spec], seqs: list, progress: Progress) -> list[list[int]]:
    """Fill ``progress`` with what a stream had delivered: each sample's tokens (its length first, if it is the
    sample's first), finished ones whole. Returns the tokens each sample had, per request."""
    out, i = [], 0
    for spec, parts in zip(specs, progress):
        cut = seqs[i:i + len(spec.outs)]
        i += len(spec.outs)
        had = [engine.generated(q) for q in cut]
        first = not spec.continued
        for part, target, done, q in zip(parts, spec.outs, had, cut):
            if done:
                part.token_ids = list((target,) + _zeros(done - 1)) if first else list(_zeros(done))
                part.finish_reason = "length" if q.finished else None
                if first:
                    part.prompt_token_ids = list(_zeros(spec.prompt))
        out.append(had)
    return out


class _Spec:
    """One request as the engine runs it: its prompt, its samples' lengths, and what it took from a bag."""

    __slots__ = ("prompt", "outs", "continued", "bag", "cached")

    def __init__(self, prompt: int, outs: list[int], continued: bool = False, bag: list[int] | None = None,
                 cached: CachedPrompt | None = None):
        self.prompt, self.outs, self.continued, self.bag = prompt, outs, continued, bag
        self.cached = cached  # its prompt as the prefix cache sees it (continued samples: not modelled)


class SimEngineClient:
    """:class:`rollout_plugin.pool.transport.http.EngineClient` backed by a :class:`SimEngine`. ``groups``: the bags
    of samples not started, by request id, shared by every client of one run (pieces go to any engine)."""

    def __init__(self, engine: SimEngine, groups: dict[str, list[int]] | None = None, *,
                 stream_min_tokens: int | None = None):
        self.engine = engine
        self.name = engine.name
        self.groups: dict[str, list[int]] = {} if groups is None else groups
        # As the HTTP client (pool/transport/http.py): calls this long stream (pool.stream_min_tokens), so their tokens so far
        # are known at a cut; others are blind — a cut sample starts over, unless vLLM's abort answered with it.
        self.stream_min_tokens = stream_min_tokens
        self._streaming: dict[int, tuple[list[_Spec], list, Progress]] = {}
        self._by_id: dict[str, SimCall] = {}  # running calls by the id the pool gave them (/abort_requests)
        self.weight_version = "0"
        self.calls = 0  # generate calls and /metrics scrapes: what a real client would send over HTTP
        self.scrapes = 0

    def _spec(self, r: Request) -> _Spec:
        prompt = int(r.metadata[PROMPT_KEY])
        outs = r.metadata[OUTPUT_KEY]
        if isinstance(r.prompt, list) and len(r.prompt) > prompt and isinstance(r.prompt[0], int):  # continued
            done = len(r.prompt) - prompt
            return _Spec(len(r.prompt), [max(1, int(r.prompt[prompt]) - done)], continued=True)
        content = r.metadata.get(CONTENT_KEY)
        cached = CachedPrompt(r.id, content, prompt, r.n) if content is not None else None
        if r.n == len(outs):  # the whole group (first send, or sent again as it was)
            return _Spec(prompt, list(outs), cached=cached)
        bag = self.groups.setdefault(r.id, list(outs))
        taken = [bag.pop(0) for _ in range(min(r.n, len(bag)))]
        if len(taken) < r.n:  # generated again after its continuation was dropped: it keeps a sibling's length
            log.debug("%s: %d sample(s) beyond the bag take the group's first lengths", r.id, r.n - len(taken))
            taken += list(outs[:r.n - len(taken)])
        return _Spec(prompt, taken, bag=taken, cached=cached)

    def _give_back(self, specs: Sequence[_Spec], request_ids: Sequence[str]) -> None:
        for spec, rid in zip(specs, request_ids):
            if spec.bag:
                self.groups.setdefault(rid, [])[:0] = spec.bag

    # A streamed call's tokens so far are filled when they matter — at a cut and at a keep-mode pause — where a
    # real stream fills them as they arrive: the same state at those moments.
    reports_progress = True
    aborts_calls = True  # /abort_requests by call id (pool/core/engine_client.py)

    async def generate(self, requests: Sequence[Request], progress: Progress | None = None, *,
                       call_id: str | None = None) -> list[Generation]:
        self.calls += 1
        specs = [self._spec(r) for r in requests]
        call = self.engine.submit([s.prompt for s in specs], [s.outs for s in specs], [s.cached for s in specs])
        if call_id is not None:
            self._by_id[call_id] = call
        try:
            return await self._run(call, requests, specs, progress)
        finally:
            if call_id is not None:
                self._by_id.pop(call_id, None)

    async def abort_call(self, call_id: str, requests: int) -> None:
        """vLLM's ``/abort_requests`` for the call's requests: it ends engine-side, answered with its tokens so
        far (finish reason ``abort``); a call already over is not an error (vLLM ignores unknown ids)."""
        del requests  # the simulator knows the call by its id alone
        await self.admin("/abort_requests", {"request_ids": [call_id]})

    async def _run(self, call: SimCall, requests: Sequence[Request], specs: list[_Spec],
                   progress: Progress | None) -> list[Generation]:
        streams = self.stream_min_tokens is not None and requests[0].sampling.max_tokens >= self.stream_min_tokens
        if progress is not None and not streams:
            for parts in progress:  # nothing streams in: what a sample has so far is unknown, not none
                for p in parts:
                    p.blind = True
            progress = None
        if progress is not None:
            self._streaming[id(call)] = (specs, call.seqs, progress)
        try:
            await call.future
        except EngineDied as exc:
            self._give_back(specs, [r.id for r in requests])
            raise Unavailable(f"{self.name}: {exc} (connection reset)") from None
        except asyncio.CancelledError:
            self.engine.abort(call)
            self._cut(requests, specs, call.seqs, progress)
            raise
        finally:
            self._streaming.pop(id(call), None)
        if call.aborted:
            return self._aborted(requests, specs, call.seqs)
        return [Generation(tuple(_sample(n) for n in s.outs), s.prompt, None if s.continued else _zeros(s.prompt))
                for s in specs]

    def _cut(self, requests: Sequence[Request], specs: Sequence[_Spec], seqs: list,
             progress: Progress | None) -> None:
        """The pool cut the call: ``progress`` gets what a stream would have delivered by then (each sample's
        tokens, finished ones whole). A request none of whose samples got a token is sent again as it was: what
        it took from its bag goes back; otherwise its samples with no token go to the bag, for the fresh piece
        the pool makes of them (those with tokens continue, each carrying its length)."""
        if progress is None:
            self._give_back(specs, [r.id for r in requests])
            return
        for r, spec, had in zip(requests, specs, _report(self.engine, specs, seqs, progress)):
            if not any(had):
                self._give_back([spec], [r.id])
            elif not spec.continued:
                self.groups.setdefault(r.id, []).extend(t for t, done in zip(spec.outs, had) if not done)

    def _aborted(self, requests: Sequence[Request], specs: Sequence[_Spec], seqs: list) -> list[Generation]:
        """vLLM's answer to a request aborted by ``/pause?mode=abort``: each sample's tokens so far, finish
        reason ``abort`` (finished samples as they ended); samples with no token go back to the bag."""
        out, i = [], 0
        for r, spec in zip(requests, specs):
            samples = []
            for target in spec.outs:
                q = seqs[i]
                i += 1
                if q.finished:
                    samples.append(_sample(target))
                    continue
                samples.append(_cut(target, q.done, not spec.continued))
                if not spec.continued:
                    bag = self.groups.setdefault(r.id, [])  # from now on its pieces draw from the bag
                    if not q.done:
                        bag.append(target)
            out.append(Generation(tuple(samples), spec.prompt, None if spec.continued else _zeros(spec.prompt)))
        return out

    async def healthy(self) -> bool:
        return self.engine.alive

    def metrics_now(self) -> EngineMetrics | None:
        return self.engine.metrics() if self.engine.alive else None

    async def metrics(self) -> str | None:
        self.scrapes += 1
        m = self.metrics_now()
        return _metrics_text(m, self.engine.profile.block_size, self.engine.cache) if m is not None else None

    async def aclose(self) -> None:
        return None

    # -- vLLM dev mode's control endpoints (vllm/entrypoints/rl/online/api_router.py, serve/dev) -------
    async def admin(self, path: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None,
                    method: str = "POST") -> Any:
        route, _, query = path.partition("?")
        if not self.engine.alive:
            raise Unavailable(f"{self.name}: {method} {path}: connection refused")
        if route == "/pause":
            mode = parse_qs(query).get("mode", ["abort"])[0]
            if mode not in ("abort", "keep"):
                raise Rejected(f"{self.name}: /pause?mode={mode}: the simulator models abort and keep", status=400)
            self.engine.pause(mode)
            if mode == "keep":  # the pool marks where the new weights begin from what streamed in so far
                for specs, seqs, progress in self._streaming.values():
                    _report(self.engine, specs, seqs, progress)
            return {"status": "paused"}
        if route == "/abort_requests":  # vllm/entrypoints/rl/online/api_router.py: unknown ids are ignored
            for rid in (body or {}).get("request_ids") or []:
                call = self._by_id.get(rid)
                if call is not None:
                    self.engine.abort(call, answer=True)
            return {"status": "aborted"}
        if route == "/resume":
            self.engine.resume()
            return {"status": "resumed"}
        if route == "/collective_rpc":  # reload_weights: the profile's bytes over its transfer bandwidth
            await asyncio.sleep(self.engine.profile.weight_load_s)
            return {"results": [None]}
        if route == "/reset_prefix_cache":
            self.engine.invalidate_cache()
            return None
        if route == "/update_weight_version":
            self.weight_version = str((body or {}).get("new_version"))
            return None
        if route == "/weight_info":
            return {"weight_version": self.weight_version}
        raise Rejected(f"{self.name}: {method} {path}: 404; the simulated engine lacks this endpoint", status=404)
