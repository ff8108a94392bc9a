"""A whole RL run on simulated engines: ``workload.steps`` trainer steps, ``train_s`` each, weight updates between.

- Baselines (``static``, ``verl``, ``distllm``) run synchronously, as verl's and TRL's synchronous trainers do:
  generate the whole step, train ``train_s`` (the engines idle), load the new weights into every engine (the
  profile's bytes over its transfer bandwidth), the next step. Every sample is trained at the version that
  made it: staleness 0.
- ``pool`` / ``pool_fixed``: the real :class:`~rollout_plugin.pool.api.pool.RolloutPool` with step quota and
  carry-over (:class:`~rollout_plugin.pool.api.steps.Steps`, in flight relative to the step, as the trainer
  adapters default to) over a dedicated fleet: while the trainer trains, the fleet goes on generating the next
  step's groups; each update goes through the pool's real ``update_weights`` in ``workload.update_mode`` with
  ``workload.max_staleness`` (one-step-off: samples of step s may come from weights s-1).

Every policy draws from the same ``steps × prompts`` groups, in the same order, and the run ends when the last
step's training does, so every group that reaches a step is one the sync baseline trains too. Figures:
``useful_tokens`` (output tokens of the samples handed to a training step), ``wasted_tokens`` (every other token
the engines generated: cut and generated again, dropped as too stale, or unfinished when the run ended),
``max_staleness_seen`` (the trainer's version minus the oldest version a trained sample's tokens came from).
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, replace

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, EngineConfig, PoolConfig
from rollout_plugin.errors import SimulationError
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.weights.sources import FolderWeights, UpdateMode
from rollout_plugin.sim.baselines import Baseline
from rollout_plugin.sim.client import SimEngineClient
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.workload import Session
from rollout_plugin.types import Result

__all__ = ["RunFigures", "busy_share", "figures_check", "run_pool_steps", "run_sync_steps"]

# The sim's weight source: FolderWeights' calls (vLLM's reload_weights + reset_prefix_cache), which the
# simulated engines answer after the profile's transfer time. The path is never read.
SIM_WEIGHTS = FolderWeights("<simulated>")


@dataclass
class RunFigures:
    """What one multi-step run trained, and when."""

    trained_samples: int = 0
    useful_tokens: int = 0
    max_staleness_seen: int = 0
    failed: int = 0
    dropped_groups: int = 0
    end_s: float = 0.0  # the last step's training ended
    step_s: tuple[float, ...] = ()  # each step's wait for its groups (generation the trainer saw)

    def take(self, results: list[Result], version: int) -> None:
        for r in results:
            self.trained_samples += len(r.samples)
            self.useful_tokens += r.output_tokens
            self.max_staleness_seen = max(self.max_staleness_seen, version - r.weight_version)


async def _load_weights(clients: list[SimEngineClient]) -> None:
    """The synchronous trainer's weight sync: nothing is in flight; every engine reloads at once."""
    for path in ("/collective_rpc", "/reset_prefix_cache"):
        await asyncio.gather(*(c.admin(path, {"method": "reload_weights"}) for c in clients if c.engine.alive))


async def run_sync_steps(base: Baseline, clients: list[SimEngineClient], steps: list[list[Session]],
                         train_s: float) -> RunFigures:
    loop = asyncio.get_running_loop()
    fig, waits = RunFigures(), []
    for s, sessions in enumerate(steps):
        started, made_before = loop.time(), base.output_tokens
        failed_before = base.failed
        await base.run(sessions)
        waits.append(loop.time() - started)
        k = sessions[0].turns[0].n
        fig.trained_samples += sum(x.turns[0].n for x in sessions) - k * (base.failed - failed_before)
        fig.useful_tokens += base.output_tokens - made_before
        await asyncio.sleep(train_s)  # the trainer; the engines idle
        if s + 1 < len(steps):
            await _load_weights(clients)
    fig.failed = base.failed
    fig.end_s = loop.time()
    fig.step_s = tuple(waits)
    return fig


async def run_pool_steps(policy: Policy, clients: list[SimEngineClient], steps: list[list[Session]],
                         cfg: SimulateConfig, engine_cfg: EngineConfig, pool_cfg: PoolConfig,
                         ctl: ControllerConfig) -> tuple[RunFigures, int]:
    """The pool's run; returns its figures and the controller's cap changes."""
    wl = cfg.workload
    if policy == Policy.pool_fixed:
        ctl = replace(ctl, mode=ControllerMode.off)
    mode = UpdateMode(wl.update_mode)
    loop = asyncio.get_running_loop()
    fig, waits = RunFigures(), []
    per_step = len(steps[0])
    source = [x.turns[0] for sessions in steps for x in sessions]
    async with RolloutPool(engine_cfg, pool_cfg, ctl, clients=clients, clock=loop.time) as pool:
        if getattr(pool, "_dispatcher", None) is not None:
            pool._dispatcher.metrics = None  # nobody scrapes it here (see runner._drive_pool)
        async with pool.steps(source, max_staleness=wl.max_staleness) as quota:
            for s in range(len(steps)):
                started = loop.time()
                groups = await quota.next(per_step)
                waits.append(loop.time() - started)
                fig.take(groups, pool.weight_version)
                await asyncio.sleep(wl.train_s)  # the trainer; the fleet goes on with the groups in flight
                if s + 1 < len(steps):
                    await pool.update_weights(s + 1, SIM_WEIGHTS, mode=mode, max_staleness=wl.max_staleness)
            fig.end_s = loop.time()
            fig.failed = len(quota.failed)
            fig.dropped_groups = len(quota.dropped)
        cap_changes = pool.monitor.cap_changes if pool.monitor is not None else 0
    fig.step_s = tuple(waits)
    return fig, cap_changes


def figures_check(fig: RunFigures, generated: float, policy: str) -> int:
    """Wasted tokens (generated, not trained); the books must balance."""
    wasted = round(generated) - fig.useful_tokens
    if wasted < 0:
        raise SimulationError(f"{policy}: trained {fig.useful_tokens} tokens, the engines generated "
                              f"{generated:.0f} (the simulator's books do not balance)")
    return wasted


def busy_share(engines: list[SimEngine], wall: float) -> float:
    return statistics.mean(min(1.0, e.busy_s / wall) for e in engines) if wall else 0.0
