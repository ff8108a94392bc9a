"""The pool behind ``trl.experimental.async_grpo.AsyncGRPOTrainer``'s two plug points.

* :class:`PoolRolloutWorker` (``RolloutWorkerProtocol``): a thread keeps the pool busy with groups
  of ``num_generations`` while the trainer trains, scores them with the trainer's reward functions
  (group-normalised advantages, as TRL's own worker does) and queues ``RolloutSample`` rows tagged
  with the weight version that produced them. Staleness is bounded twice: the queue holds at most
  ``queue_maxsize`` samples (generation stops ahead of training), and the trainer drops samples
  older than ``max_staleness`` versions.
* :class:`PoolWeightTransfer` (``WeightTransferProtocol``): each sync writes the weights to a
  folder and every engine reloads them in place (see :mod:`.weights`), under the pool's weight
  update, so no result mixes versions.

``async_grpo_on_cpu()`` lets AsyncGRPOTrainer train where CUDA and its FlashAttention-3 kernel are
not available: a plain PyTorch varlen attention with the same contract, and no GPU FLOPs query.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.trl.backend import checked, group_requests, sample_logprobs
from rollout_plugin.adapters.trl.callback import PREFIX, PoolMetrics
from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.weights import reload_engines, write_weights
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import Result, SamplingParams

if TYPE_CHECKING:
    from rollout_plugin.pool.pool import SyncRolloutPool

log = logging.getLogger(__name__)


def _reward_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class PoolRolloutWorker:
    """Produces scored ``RolloutSample`` rows from the pool on a background thread (main process only)."""

    def __init__(self, pool: SyncRolloutPool, dataset: Sequence[dict[str, Any]], reward_funcs: Sequence[Callable],
                 processing_class: Any, *, num_generations: int, sampling: SamplingParams,
                 groups_per_call: int = 4, queue_maxsize: int = 64):
        require_trl()
        from trl.experimental.async_grpo.async_rollout_worker import RolloutSample

        self._sample_cls = RolloutSample
        self.pool = pool
        self.dataset = dataset
        self.reward_funcs = list(reward_funcs)
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.k = num_generations
        self.sampling = sampling if sampling.logprobs else SamplingParams(**{**sampling.__dict__, "logprobs": True})
        self.groups_per_call = groups_per_call
        self.rollout_buffer: queue.Queue = queue.Queue(maxsize=queue_maxsize)
        self.metrics_queue: queue.Queue = queue.Queue()
        self.model_version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_put = time.monotonic()
        self._group_ids = itertools.count()
        self._metrics = PoolMetrics()
        self.produced = 0  # samples queued so far

    # -- RolloutWorkerProtocol ---------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._last_put = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trl-pool-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # The thread finishes its current pool call (bounded by the pool's request timeout) and exits.
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

    # -- the loop ----------------------------------------------------------------------------------
    def _rows(self) -> Iterator[dict[str, Any]]:
        while True:  # cycles the dataset: the trainer decides when training ends
            yield from (dict(self.dataset[i]) for i in range(len(self.dataset)))

    def _run(self) -> None:
        rows = self._rows()
        try:
            while not self._stop.is_set():
                batch = [next(rows) for _ in range(self.groups_per_call)]
                prompt_ids = [self._render(row["prompt"]) for row in batch]
                results = checked(self.pool.generate(group_requests(prompt_ids, self.k, self.sampling, "trl-async")))
                for row, ids, result in zip(batch, prompt_ids, results):
                    for sample in self._score(row, ids, result):
                        if not self._put(sample):
                            return
                self.metrics_queue.put({PREFIX + k: v for k, v in self._metrics.snapshot(self.pool).items()})
        except BaseException as exc:  # surfaced to the trainer by check_health
            log.error("pool rollout worker stopped: %s", exc)
            self._error = exc

    def _put(self, sample: Any) -> bool:
        while not self._stop.is_set():
            try:
                self.rollout_buffer.put(sample, timeout=0.5)  # a full queue holds generation back
                self._last_put = time.monotonic()
                self.produced += 1
                return True
            except queue.Full:
                continue
        return False

    def _render(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list):
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

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
        out = []
        for i, completion in enumerate(completions):
            toks = ids[i]
            lps = sample_logprobs(result, i)  # old_log_probs: a missing one fails loudly, never 0.0
            metrics = {"reward": float(rewards[i]), "reward_std": float(rewards.std()),
                       **{f"rewards/{name}": float(v[i]) for name, v in per_func.items()}}
            out.append(self._sample_cls(
                prompt=row["prompt"], completion=completion,
                input_ids=np.asarray(prompt_ids + toks, dtype=np.int64),
                completion_mask=np.asarray([0] * len(prompt_ids) + [1] * len(toks), dtype=np.int64),
                old_log_probs=np.asarray([0.0] * len(prompt_ids) + lps, dtype=np.float32),
                advantage=float(advantages[i]), model_version=result.weight_version, group_id=group,
                metrics=metrics, enqueued_at=time.time()))
        return out


class PoolWeightTransfer:
    """``WeightTransferProtocol`` over the pool: safetensors in a shared folder, in-place reload on every engine."""

    def __init__(self, pool: SyncRolloutPool, weights_dir: str | Path, *, timeout_s: float | None = 600.0):
        self.pool = pool
        self.folder = Path(weights_dir).resolve()
        self.timeout_s = timeout_s
        self.version = 0  # AsyncGRPOTrainer.model_version counts syncs from 0 the same way
        self.sync_s: list[float] = []

    def init_weight_transfer(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def pause(self) -> None:
        """Nothing to do: the pool pauses admission and drains inside the update (see :meth:`send_weights`)."""

    def send_weights(self, iterator: Iterator[tuple[str, Any]]) -> None:
        t0 = time.perf_counter()
        write_weights(iterator, self.folder)
        version, folder, timeout = self.version + 1, str(self.folder), self.timeout_s
        self.pool.run(lambda p: reload_engines(p, folder, version, timeout_s=timeout))
        self.version = version
        self.sync_s.append(time.perf_counter() - t0)
        log.info("weights: async version %d published (%.2fs)", version, self.sync_s[-1])

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
