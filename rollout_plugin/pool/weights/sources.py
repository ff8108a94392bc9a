"""Weight updates: how in-flight work crosses them, and which weights each engine really holds.

Modes (``RolloutPool.weight_update(version, mode=...)``), each measured in ``benchmarks/weight_modes.py``:

- ``drain``: admission pauses, in-flight samples finish under the old weights, then the load. Strictly
  on-policy; the engines idle while the longest sample finishes.
- ``keep``: vLLM's ``/pause?mode=keep`` freezes in-flight requests with their KV cache, the weights load,
  ``/resume`` continues them under the new weights. No token is lost or waited for; a sample spans two
  versions (its segments say where, when its call streamed).
- ``continue``: vLLM's ``/pause?mode=abort`` ends in-flight requests at once, answering with the tokens
  generated so far (finish reason ``abort``); each sample continues as a new request (prompt + its tokens)
  under the new weights, on any engine (:mod:`rollout_plugin.pool.core.continuation`).
- ``restart``: in-flight requests are cancelled and generated again from scratch (the old ``abort=True``).

The steps around these (pause, load, verify, adopt, resume), their one lock and what each failure undoes:
:mod:`rollout_plugin.pool.weights.update`.

Identity: after a load the pool sets each engine's version (vLLM's ``/update_weight_version``), reads it
back (``/weight_info``) and, with ``verify="checksum"``, compares ``/weight_checker`` checksums across
engines: a mismatch names the engine. Results carry the version their engine reported. An engine that
(re)starts or joins after the weights changed is *stale* — out of rotation — until it is refit from the
pool's last :class:`WeightSource`; without one it stays out, and says why.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from rollout_plugin.errors import EngineError
from rollout_plugin.pool.transport.rpc import RpcAnswer, require_ok

if TYPE_CHECKING:
    from rollout_plugin.pool import RolloutPool

log = logging.getLogger(__name__)

__all__ = ["EngineControl", "FolderWeights", "InPlaceWeights", "UpdateMode", "WeightSource", "check_identity",
           "engine_pause"]


class UpdateMode(str, Enum):
    drain = "drain"
    keep = "keep"
    continue_ = "continue"
    restart = "restart"


class EngineControl(Protocol):
    """What a weight source may call on the pool (:class:`~rollout_plugin.pool.api.pool.RolloutPool` is one): the
    control fan-out to named engines, and the engines' names."""

    @property
    def engine_names(self) -> list[str]: ...

    async def engine_rpc(self, path: str, body: dict | None = None, *, timeout_s: float | None = None,
                         method: str = "POST", engines: Sequence[str] | None = None) -> list[RpcAnswer]: ...


class WeightSource(Protocol):
    """Where the current weights come from, so the pool can load them into any engine, any time (a
    restarted engine is refit from the last one)."""

    description: str

    async def load(self, control: EngineControl, engines: Sequence[str]) -> None:
        """Load the weights into the named engines through ``control`` (raise :class:`EngineError` naming a
        failing one)."""


@dataclass(frozen=True)
class FolderWeights:
    """Safetensors in a folder every engine can read, reloaded in place (vLLM dev mode's
    ``reload_weights``); the prefix cache is reset after, its blocks were computed with the old weights."""

    path: str
    timeout_s: float | None = 600.0

    @property
    def description(self) -> str:
        return f"folder {self.path}"

    async def load(self, control: EngineControl, engines: Sequence[str]) -> None:
        body: dict[str, Any] = {"method": "reload_weights", "kwargs": {"weights_path": self.path}}
        if self.timeout_s is not None:
            body["timeout"] = self.timeout_s
        require_ok(await control.engine_rpc("/collective_rpc", body, timeout_s=self.timeout_s, engines=engines))
        answers = await control.engine_rpc("/reset_prefix_cache", timeout_s=self.timeout_s, engines=engines)
        if not all(a.ok and (a.body or {}).get("success", True) is not False for a in answers):
            log.warning("reset_prefix_cache did not succeed on every engine: %s", answers)


@dataclass(frozen=True)
class InPlaceWeights:
    """Each engine reloads its own model path in place (vLLM's ``reload_weights`` without a path: the files the
    trainer wrote where the engines load from; the gateway's ``/admin/reload_weights``)."""

    timeout_s: float | None = 600.0

    @property
    def description(self) -> str:
        return "the engines' own model path, reloaded in place"

    async def load(self, control: EngineControl, engines: Sequence[str]) -> None:
        require_ok(await control.engine_rpc("/collective_rpc", {"method": "reload_weights"},
                                            timeout_s=self.timeout_s, engines=engines))
        answers = await control.engine_rpc("/reset_prefix_cache", timeout_s=self.timeout_s, engines=engines)
        if not all(a.ok and (a.body or {}).get("success", True) is not False for a in answers):
            log.warning("reset_prefix_cache did not succeed on every engine: %s", answers)


ABORT_GRACE_S = 2.0  # aborted calls answer within this; a call still out after it never reached the engine


async def engine_pause(pool: RolloutPool, mode: str, engines: Sequence[str]) -> list[str]:
    """vLLM's ``/pause?mode=…`` on ``engines``; the names of those that could not pause (not in dev mode,
    or ``/pause`` answered 500: ``vllm/entrypoints/rl/online/api_router.py``)."""
    answers = await pool.engine_rpc(f"/pause?mode={mode}", timeout_s=pool.pool_cfg.timeouts.request_s, engines=engines)
    for a in answers:
        if not a.ok:
            log.warning("%s: running -> running (could not pause mode=%s: %s)", a.engine, mode, a.error)
    return [a.engine for a in answers if not a.ok]


async def check_identity(pool: RolloutPool, version: int, engines: Sequence[str], *,
                         checksum: bool) -> dict[str, int | None]:
    """Set ``version`` on ``engines``, read it back, and (``checksum``) compare weight checksums across them
    (engines out of rotation may hold other weights: they are not asked). Returns each engine's reported
    version (None: the engine has no such endpoint, e.g. not vLLM or not in dev mode). A mismatch raises
    :class:`EngineError` naming the engine."""
    await pool.engine_rpc("/update_weight_version", {"new_version": str(version)}, engines=engines)
    reported: dict[str, int | None] = {}
    for a in await pool.engine_rpc("/weight_info", method="GET", engines=engines):
        text = (a.body or {}).get("weight_version") if a.ok and isinstance(a.body, dict) else None
        reported[a.engine] = int(text) if text is not None and str(text).lstrip("-").isdigit() else None
        if a.ok and reported[a.engine] != version:
            raise EngineError(f"{a.engine}: reports weight version {text!r} after the update to {version}")
    if checksum:
        await _compare_checksums(pool, engines)
    return reported


async def _compare_checksums(pool: RolloutPool, engines: Sequence[str]) -> None:
    answers = [a for a in await pool.engine_rpc("/weight_checker", {"action": "checksum"},
                                                timeout_s=pool.pool_cfg.timeouts.request_s, engines=engines)
               if a.ok and isinstance(a.body, dict) and a.body.get("checksums")]
    if len(answers) < 2:
        return
    digests = {a.engine: tuple(sorted(a.body["checksums"].items())) for a in answers}
    common, count = Counter(digests.values()).most_common(1)[0]
    odd = [name for name, d in digests.items() if d != common]
    if odd:
        ref = next(name for name, d in digests.items() if d == common)
        raise EngineError(f"{', '.join(odd)}: weight checksums differ from {ref}'s "
                          f"({count} of {len(digests)} engines agree); that engine holds other weights")
