"""The pool behind ``trl.experimental.async_grpo.AsyncGRPOTrainer``'s two plug points.

* :class:`PoolRolloutWorker` (``RolloutWorkerProtocol``): a thread keeps ``in_flight`` groups of
  ``num_generations`` generating while the trainer trains, and the moment one is whole it is scored with
  the trainer's reward functions (group-normalised advantages, as TRL's own worker does) and queued as
  ``RolloutSample`` rows; its slot goes to the next prompt at once. No group waits for a slower one (a
  step's worth of groups sent together would finish with the slowest), and groups still generating at a
  weight sync carry over into the new version instead of holding it up (step quota with carry-over).
* :class:`PoolWeightTransfer` (``WeightTransferProtocol``): each sync writes the weights to a folder and
  every engine reloads them in place (see :mod:`.weights`) under the pool's weight update, in
  ``update_mode`` (default ``continue``: in-flight samples keep their tokens and go on under the new
  weights; :mod:`rollout_plugin.pool.weights.sources`).

Staleness: a sample that crossed a sync was made by several versions (its segments say which tokens);
its group is tagged with the oldest (:func:`~rollout_plugin.adapters.common.versions.staleness_version`, which
says why), so the
trainer's ``max_staleness`` drop stays a bound on every token. ``max_staleness`` in
:class:`~.config.AsyncRolloutConfig` restarts older work at the sync instead of finishing it only to be
dropped. Generation stays bounded: at most ``in_flight`` groups generate, and a full queue
(``queue_maxsize`` samples) holds the worker back.

Why ``pool.submit`` and not ``pool.steps``: the worker is a thread that hands on one group at a time,
and prompts are rendered with the trainer's tokenizer on that thread (a HF fast tokenizer must not be
used from two threads at once, and scoring decodes on it), so it submits each group itself and the
pool's loop only signals completions back.

``async_grpo_on_cpu()`` lets AsyncGRPOTrainer train where CUDA and its FlashAttention-3 kernel are
not available: a plain PyTorch varlen attention with the same contract, and no GPU FLOPs query.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.common.metrics import PREFIX, PoolLogMetrics
from rollout_plugin.adapters.common.translate import checked, group_requests, render_prompt, sample_logprobs
from rollout_plugin.adapters.common.versions import staleness_version, versions_spanned
from rollout_plugin.adapters.common.weights import FolderPublisher
from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.config import AsyncRolloutConfig, checked_async_config, resolved_in_flight
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import Request, Result, SamplingParams

if TYPE_CHECKING:
    from rollout_plugin.pool import RolloutPool, SyncRolloutPool

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting worker looks at its stop flag
METRICS_EVERY_S = 1.0  # pool metrics at most this often (each is a snapshot on the pool's loop)


def _reward_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


async def _cancel(futures: list[asyncio.Future]) -> None:
    for f in futures:
        f.cancel()  # the pool drops what is queued and stops what runs (outcome "abandoned")


class PoolRolloutWorker:
    """Produces scored ``RolloutSample`` rows from the pool on a background thread (main process only).

    ``config`` (or its fields as keywords, e.g. ``in_flight=16``): :class:`~.config.AsyncRolloutConfig`.
    ``chat_template_kwargs``: extra chat template arguments for conversational prompts, as TRL's own worker
    takes them (``AsyncGRPOConfig.chat_template_kwargs``)."""

    def __init__(self, pool: SyncRolloutPool, dataset: Sequence[dict[str, Any]], reward_funcs: Sequence[Callable],
                 processing_class: Any, *, num_generations: int, sampling: SamplingParams,
                 config: AsyncRolloutConfig | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                 **settings: Any):
        require_trl()
        from trl.experimental.async_grpo.async_rollout_worker import RolloutSample

        cfg = checked_async_config(config, settings)
        self._sample_cls = RolloutSample
        self.pool = pool
        self.dataset = dataset
        self.reward_funcs = list(reward_funcs)
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.k = num_generations
        self.sampling = sampling if sampling.logprobs else SamplingParams(**{**sampling.__dict__, "logprobs": True})
        self._cfg = cfg
        self.in_flight = cfg.in_flight  # resolved by start(): fixed, or relative to groups_per_step
        self.rollout_buffer: queue.Queue = queue.Queue(maxsize=cfg.queue_maxsize)
        self.metrics_queue: queue.Queue = queue.Queue()
        self.model_version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_put = time.monotonic()
        self._group_ids = itertools.count()
        self._metrics = PoolLogMetrics()
        self._last_metrics = float("-inf")
        # The worker thread's own books; the pool's loop only puts finished futures on ``_landed``.
        self._landed: queue.Queue[asyncio.Future[Result]] = queue.Queue()
        self._pending: set[asyncio.Future[Result]] = set()
        self._rows: dict[str, tuple[dict[str, Any], list[int]]] = {}  # request id -> its dataset row, prompt ids
        self._failed_in_row = 0
        self.submitted = 0  # groups sent to the pool
        self.groups_out = 0  # groups scored and queued
        self.failed = 0  # groups the pool gave up on (after its retries): not queued, their slot refilled
        self.produced = 0  # samples queued so far

    # -- RolloutWorkerProtocol ---------------------------------------------------------------------
    def start(self) -> None:
        self.in_flight = resolved_in_flight(self._cfg)  # a ConfigError before any generation, naming the key
        self._stop.clear()
        self._last_put = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trl-pool-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # The thread notices within POLL_S (or after scoring the group in hand), cancels what is in flight, exits.
            self._thread.join()
            self._thread = None

    def update_model_version(self, model_version: int) -> None:
        self.model_version = model_version

    def check_health(self, stale_after_s: float) -> None:
        if self._error is not None:
            raise TrainerAdapterError(f"the pool rollout worker failed: {self._error}") from self._error
        if self._thread is None or not self._thread.is_alive():
            raise TrainerAdapterError("the pool rollout worker is not running")
        idle = time.monotonic() - self._last_put
        if idle > stale_after_s and not self.rollout_buffer.full():
            raise TrainerAdapterError(f"the pool rollout worker produced nothing for {idle:.0f}s "
                                      f"(heartbeat_stale_after_s={stale_after_s:g})")

    @property
    def pending(self) -> int:
        """Groups submitted and not yet taken back (generating, or finished and waiting to be scored)."""
        return len(self._pending)

    # -- the loop ----------------------------------------------------------------------------------
    def _rows_cycle(self) -> Iterator[dict[str, Any]]:
        while True:  # cycles the dataset: the trainer decides when training ends
            yield from (dict(self.dataset[i]) for i in range(len(self.dataset)))

    def _run(self) -> None:
        rows = self._rows_cycle()
        try:
            while not self._stop.is_set():
                self._fill(rows)
                try:
                    future = self._landed.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                taken = self._take(future)
                if taken is None:
                    continue
                for sample in self._score(*taken):
                    if not self._put(sample):
                        return
                self.groups_out += 1
                self._push_metrics()
        except BaseException as exc:  # surfaced to the trainer by check_health
            log.error("pool rollout worker stopped: %s", exc)
            self._error = exc
        finally:
            self._abandon()

    def _fill(self, rows: Iterator[dict[str, Any]]) -> None:
        """Top the groups in flight up to ``in_flight``, one new prompt per free slot."""
        while len(self._pending) < self.in_flight and not self._stop.is_set():
            row = next(rows)
            ids = render_prompt(self.tokenizer, row["prompt"], self.chat_template_kwargs)
            (request,) = group_requests([ids], self.k, self.sampling, "trl-async")
            self._rows[request.id] = (row, ids)
            self._pending.add(self.pool.run(lambda p, r=request: self._submit(p, r)))
            self.submitted += 1

    async def _submit(self, pool: RolloutPool, request: Request) -> asyncio.Future[Result]:
        future = pool.submit(request)  # on the pool's loop; the callback runs there too
        future.add_done_callback(self._landed.put_nowait)
        return future

    def _take(self, future: asyncio.Future[Result]) -> tuple[dict[str, Any], list[int], Result] | None:
        """A finished group's row, prompt ids and result; None for a failed group (logged, its slot refilled)."""
        self._pending.discard(future)
        if future.cancelled():
            return None
        if future.exception() is not None:
            raise future.exception()  # PoolError: every engine is dead
        result = future.result()
        row, ids = self._rows.pop(result.id)
        if not result.ok:
            self.failed += 1
            self._failed_in_row += 1
            log.warning("trl-async: %s failed after the pool's retries (%s); the next prompt takes its slot",
                        result.id, result.error)
            if self._failed_in_row >= 2 * self.in_flight:
                raise TrainerAdapterError(f"the last {self._failed_in_row} rollout groups all failed; last: "
                                          f"{result.id}: {result.error}")
            return None
        self._failed_in_row = 0
        checked([result])  # token ids present
        return row, ids, result

    def _abandon(self) -> None:
        """Stop what is still in flight (on the pool's loop); the pool resolves it as abandoned."""
        pending, self._pending = list(self._pending), set()
        self._rows.clear()
        if not pending:
            return
        try:
            self.pool.run(lambda p: _cancel(pending))
        except Exception as exc:  # noqa: BLE001 - the pool closed first: its close resolved them already
            log.debug("trl-async: could not cancel %d groups in flight: %s", len(pending), exc)

    def _push_metrics(self) -> None:
        now = time.monotonic()
        if now - self._last_metrics < METRICS_EVERY_S:
            return
        self._last_metrics = now
        snap = self._metrics.snapshot(self.pool)
        snap.update(groups_in_flight=float(len(self._pending)), groups_failed=float(self.failed))
        self.metrics_queue.put({PREFIX + k: v for k, v in snap.items()})

    def _put(self, sample: Any) -> bool:
        while not self._stop.is_set():
            try:
                self.rollout_buffer.put(sample, timeout=POLL_S)  # a full queue holds generation back
                self._last_put = time.monotonic()
                self.produced += 1
                return True
            except queue.Full:
                continue
        return False

    def _score(self, row: dict[str, Any], prompt_ids: list[int], result: Result) -> list[Any]:
        import numpy as np

        ids = [list(s.token_ids or ()) for s in result.samples]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        chat = isinstance(row["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        columns = {k: [v] * len(ids) for k, v in row.items() if k != "prompt"}
        per_func = {_reward_name(f): f(prompts=[row["prompt"]] * len(ids), completions=completions,
                                       completion_ids=ids, **columns) for f in self.reward_funcs}
        rewards = np.nansum(np.array([[r if r is not None else np.nan for r in v] for v in per_func.values()],
                                     dtype=float), axis=0)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        group = next(self._group_ids)
        version = staleness_version(result)  # the oldest weights of any token in the group: see its docstring
        out = []
        for i, completion in enumerate(completions):
            toks = ids[i]
            lps = sample_logprobs(result, i)  # old_log_probs: a missing one fails loudly, never 0.0
            metrics = {"reward": float(rewards[i]), "reward_std": float(rewards.std()),
                       **{f"rewards/{name}": float(v[i]) for name, v in per_func.items()},
                       PREFIX + "versions_spanned": float(versions_spanned(result.samples[i]))}
            out.append(self._sample_cls(
                prompt=row["prompt"], completion=completion,
                input_ids=np.asarray(prompt_ids + toks, dtype=np.int64),
                completion_mask=np.asarray([0] * len(prompt_ids) + [1] * len(toks), dtype=np.int64),
                old_log_probs=np.asarray([0.0] * len(prompt_ids) + lps, dtype=np.float32),
                advantage=float(advantages[i]), model_version=version, group_id=group,
                metrics=metrics, enqueued_at=time.time()))
        return out


class PoolWeightTransfer:
    """``WeightTransferProtocol`` over the pool: safetensors in a shared folder, in-place reload on every engine.

    ``config`` (or ``update_mode=`` / ``max_staleness=`` as keywords): how groups still generating cross each
    sync (:class:`~.config.AsyncRolloutConfig`; give the worker the same one)."""

    def __init__(self, pool: SyncRolloutPool, weights_dir: str | Path, *, config: AsyncRolloutConfig | None = None,
                 timeout_s: float | None = 600.0, **settings: Any):
        cfg = checked_async_config(config, settings)
        self.pool = pool
        self.folder = Path(weights_dir).resolve()
        self.timeout_s = timeout_s
        self.mode = str(cfg.update_mode.value)
        self.max_staleness = cfg.max_staleness
        self._publisher = FolderPublisher(pool, self.folder, mode=self.mode, max_staleness=self.max_staleness,
                                          timeout_s=timeout_s)
        self.version = 0  # AsyncGRPOTrainer.model_version counts syncs from 0 the same way
        self.sync_s: list[float] = []

    def init_weight_transfer(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def pause(self) -> None:
        """Nothing to do: the pool pauses admission inside the update and, by ``update_mode``, carries in-flight
        groups across it (see :meth:`send_weights`)."""

    def send_weights(self, iterator: Iterator[tuple[str, Any]]) -> None:
        version = self.version + 1
        record = self._publisher.publish(iterator, version)
        self.version = version
        self.sync_s.append(record.total_s)
        log.info("weights: async version %d published (%.2fs, in-flight groups: %s)", version, self.sync_s[-1],
                 self.mode)

    def resume(self) -> None:
        """Nothing to do: the pool resumed with the new version when the reload finished."""

    def destroy(self) -> None:
        pass


class _TorchVarlen:
    """``flash_attn_varlen_func`` in plain PyTorch: per segment, causal attention aligned bottom-right (as FA)."""

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=True, window_size=(-1, -1), **kwargs):
        import torch
        import torch.nn.functional as F

        out = torch.zeros_like(q)
        groups = q.shape[1] // k.shape[1]
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            if cq[i + 1] <= cq[i]:
                continue
            qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # (H, Lq, D)
            ki = k[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
            vi = v[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
            lq, lk = qi.shape[1], ki.shape[1]
            mask = None
            if causal:
                mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale)
            out[cq[i]:cq[i + 1]] = o.transpose(0, 1)
        return out


def async_grpo_on_cpu() -> None:
    """Let AsyncGRPOTrainer (TRL 1.16, written for CUDA) train on CPU: tree attention in plain PyTorch instead of
    the FlashAttention-3 kernel, and no CUDA device query for the MFU estimate. A no-op where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    from trl.experimental.async_grpo import async_grpo_trainer, packing

    packing._flash_attn = lambda: _TorchVarlen  # tree_attention looks the kernel up on each call
    async_grpo_trainer.get_peak_flops_per_device = lambda accelerator, dtype: None  # no MFU on CPU
