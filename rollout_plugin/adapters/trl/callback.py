"""``RolloutPoolCallback``: the pool's lifecycle, weight sync after each optimizer step, pool metrics in TRL's logs.

Two ways in:

* ``attach(trainer, pool)`` installs the generation backend and this callback (bound to the trainer);
* ``cb = RolloutPoolCallback(engine=..., pool_config=...)`` passed as ``callbacks=[cb]`` together with
  ``rollout_func=cb.rollout_func``: the callback starts the pool, TRL calls the rollout function,
  which binds the trainer on its first call.

Metrics go into the trainer's own metric buffer (``rollout_pool/*``), so they reach
``state.log_history`` and every ``report_to`` integration (tensorboard, wandb) with TRL's metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from rollout_plugin.adapters.common.metrics import PREFIX, PoolLogMetrics
from rollout_plugin.adapters.common.ranks import check_one_pool, everyone
from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.weights import WeightSync
from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    from rollout_plugin.adapters.trl.config import WeightsConfig
    from rollout_plugin.config.schema import EngineConfig, PoolConfig
    from rollout_plugin.pool import SyncRolloutPool

log = logging.getLogger(__name__)


def weight_sync(trainer: Any, pool: SyncRolloutPool | None, weights: WeightsConfig | None = None,
                weights_dir: str | Path | None = None) -> WeightSync:
    """This rank's :class:`WeightSync` for ``trainer`` (``pool`` on the main process, None elsewhere)."""
    from rollout_plugin.adapters.trl.config import WeightsConfig

    cfg = weights or WeightsConfig()
    if weights_dir is not None and cfg.dir is not None and str(weights_dir) != cfg.dir:
        raise TrainerAdapterError(f"weights_dir={str(weights_dir)!r} and weights.dir={cfg.dir!r}: give one")
    folder = weights_dir or cfg.dir or Path(trainer.args.output_dir) / "rollout_weights"
    nccl = None
    if str(getattr(cfg.transport, "value", cfg.transport)) == "nccl":
        from rollout_plugin.adapters.trl.nccl import NcclOptions

        nccl = NcclOptions(host=cfg.nccl_host, port=cfg.nccl_port, buffer_bytes=cfg.nccl_buffer_mib << 20,
                           num_buffers=cfg.nccl_num_buffers)
    return WeightSync(pool, folder, accelerator=trainer.accelerator, transport=cfg.transport, nccl=nccl,
                      timeout_s=cfg.timeout_s)


class RolloutPoolCallback(TrainerCallback):
    """Pool lifecycle, weight sync after each optimizer step, and ``rollout_pool/*`` metrics.

    ``pool``: a started :class:`SyncRolloutPool` (you own it), or None with ``engine``/``pool_config``
    to have the callback start one on the main process and stop it at train end."""

    def __init__(self, pool: SyncRolloutPool | None = None, *, engine: EngineConfig | None = None,
                 pool_config: PoolConfig | None = None, weights_dir: str | Path | None = None,
                 weights: WeightsConfig | None = None):
        require_trl()
        self.pool = pool
        self._engine_cfg, self._pool_cfg = engine, pool_config
        self._owned: SyncRolloutPool | None = None
        self._weights_dir = weights_dir
        self._weights_cfg = weights
        self.weights: WeightSync | None = None
        self.trainer: Any = None
        self._model: Any = None
        self._metrics = PoolLogMetrics()
        self._pending: dict[str, float] = {}

    # -- wiring --------------------------------------------------------------------------------
    def start_pool(self) -> SyncRolloutPool:
        """The pool, started now if the callback owns it (main process only)."""
        if self.pool is None:
            from rollout_plugin.pool import SyncRolloutPool

            if self._engine_cfg is None:
                raise TrainerAdapterError("RolloutPoolCallback has no pool: pass pool=, or engine= (and "
                                          "pool_config=) for the callback to start one")

            self._owned = SyncRolloutPool(self._engine_cfg, self._pool_cfg)
            self._owned.__enter__()
            self.pool = self._owned
        return self.pool

    def close(self) -> None:
        if self._owned is not None:
            owned, self._owned, self.pool = self._owned, None, None
            owned.__exit__(None, None, None)

    def bind(self, trainer: Any, weights: WeightSync | None = None) -> None:
        """Know the trainer (its model, metric buffer, output_dir) and the weight publisher (every rank)."""
        acc = trainer.accelerator

        def setup() -> None:  # on every rank: a refusal, or a pool that fails to start, stops every rank here
            check_one_pool(acc, self.pool)
            if weights is None and acc.is_main_process:
                self.start_pool()

        everyone(acc, setup)
        self.trainer = trainer
        self._model = trainer.model  # the model TRL's own backend gathers (accelerate wraps it in place)
        self.weights = weights or weight_sync(trainer, self.pool, self._weights_cfg, self._weights_dir)

    @property
    def rollout_func(self):
        """TRL's public ``rollout_func`` hook served by this callback's pool (see :mod:`.rollout`)."""
        from rollout_plugin.adapters.trl.rollout import make_rollout_func

        return make_rollout_func(self)

    # -- TrainerCallback hooks -----------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.pool is None and self._engine_cfg is not None:
            self.start_pool()  # engines start while the rest of the set-up runs

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Every rank: gathering sharded weights is a collective; the main process publishes them.
        if self.weights is not None and self._model is not None:
            record = self.weights.sync(self._model, state.global_step)
            if record is not None and state.is_world_process_zero:
                self._pending["weight_sync_s"] = record.total_s
                self._pending["weight_write_s"] = record.write_s
                self._pending["weight_gather_s"] = record.gather_s
        if not state.is_world_process_zero or self.pool is None:
            return
        self._pending.update(self._metrics.snapshot(self.pool))
        self._flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Without a bound trainer the numbers go into this log call (reaching integrations after us).
        if logs is not None and self._pending:
            logs.update({PREFIX + k: v for k, v in self._pending.items()})
            self._pending.clear()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def _flush(self) -> None:
        sink = getattr(self.trainer, "_metrics", None)
        if isinstance(sink, dict) and "train" in sink:
            for key, value in self._pending.items():
                sink["train"][PREFIX + key].append(value)
            self._pending.clear()
