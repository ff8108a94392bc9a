"""An engine's life as one state machine: its states, every legal transition with its cause, in one table.

::

    absent ──► live ◄──► suspect            (a failed call; the probe decides)
      │         │           │
      │         └──► dead ◄─┘ ◄── stale, refitting (lost)
      │               │ ▲
      │               ▼ │ (restart failed)
      │            restarting ──► live      (the pool's weights never changed)
      │               │
      └──────────►  stale ◄──► refitting ──► live   (the refit failed / loaded and checked)
    live ──► stale: a weight load into it failed half-way
    live, suspect, stale, dead ──► retired  (out for good; nothing leaves it)

The slot holds one :class:`EngineState` (:class:`~rollout_plugin.pool.core.slots.EngineSlot`); the old flags
(``healthy``, ``suspect``, ``recovering``, ``stale``) are derived from it. :func:`check` is the only gate:
a transition missing from :data:`TRANSITIONS` is a bug and raises :class:`IllegalTransition`.

"Alive" for hopelessness (:func:`outlook`) means *can serve the current weights*: live, or coming back to
live (a restart that will hold the pool's weights or can be refit, a refit under way, a stale engine the
trainer's next weight sync reaches). The values are the strings timelines record (``"live"``; files written
before this module said ``"healthy"`` for it, and the plot reads both).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["EngineState", "EngineView", "IllegalTransition", "Outlook", "Refit", "TRANSITIONS", "check", "outlook",
           "stuck_error"]


class EngineState(str, Enum):
    absent = "absent"  # not in the pool yet: the old state of a join
    live = "live"  # in rotation
    suspect = "suspect"  # a call failed as if the engine were down: out of rotation while a probe decides
    dead = "dead"  # out; its calls moved elsewhere under the same ids
    restarting = "restarting"  # dead, and a restart is under way
    stale = "stale"  # running, but may hold other weights than the pool's: out until refit
    refitting = "refitting"  # stale, and the pool's weights are being loaded into it
    retired = "retired"  # out for good; what it ran finished there

    def __str__(self) -> str:  # the plain value in logs and f-strings
        return self.value


S = EngineState

# (old, new) -> the cause that makes the transition legal. Every state change goes through this table.
TRANSITIONS: dict[tuple[EngineState, EngineState], str] = {
    (S.absent, S.live): "joined holding the pool's weights",
    (S.absent, S.stale): "joined after the weights changed: what it holds is unknown",
    (S.live, S.suspect): "a call failed as if the engine were down; a health probe decides",
    (S.suspect, S.live): "the health probe passed",
    (S.live, S.dead): "declared dead: a failed probe, a hang, its backend lost it",
    (S.suspect, S.dead): "the health probe failed",
    (S.stale, S.dead): "lost while out of rotation",
    (S.refitting, S.dead): "lost while being refit",
    (S.dead, S.restarting): "the pool launched it and it has restarts left",
    (S.restarting, S.live): "restarted, and the pool still runs the initial weights",
    (S.restarting, S.stale): "restarted with its initial weights after the pool's weights changed",
    (S.restarting, S.dead): "the restart failed",
    (S.live, S.stale): "a weight load into it failed half-way: what it holds is unknown",
    (S.stale, S.refitting): "the pool's current weights are being loaded into it",
    (S.refitting, S.live): "refit to the pool's weights and checked",
    (S.refitting, S.stale): "the refit's load or check failed",
    (S.live, S.retired): "retired by the caller or its backend",
    (S.suspect, S.retired): "retired by the caller or its backend",
    (S.stale, S.retired): "retired by the caller or its backend",
    (S.dead, S.retired): "retired by the caller or its backend",
}


class IllegalTransition(RuntimeError):
    """A state change missing from :data:`TRANSITIONS`: a bug in the pool, never an engine's fault."""


def check(name: str, old: EngineState, new: EngineState) -> str:
    """The cause that makes ``old -> new`` legal for engine ``name``; raises :class:`IllegalTransition`."""
    cause = TRANSITIONS.get((old, new))
    if cause is None:
        raise IllegalTransition(f"{name}: {old} -> {new} is not a transition of the engine state machine "
                                f"(from {old}: {', '.join(str(b) for a, b in TRANSITIONS if a is old) or 'none'})")
    return cause


class Refit(str, Enum):
    """How an engine that restarted or joined with other weights can get the pool's current ones."""

    none = "none"  # no weight source: weights were loaded inside weight_update() (gateway reload, raw RPCs)
    held = "held"  # the pool holds the last WeightSource (update_weights): it refits at once
    pushed = "pushed"  # the trainer pushes weights at every sync (TRL's NCCL transport): refit at the next


class Outlook(str, Enum):
    serving = "serving"  # some engine serves the current weights, or will without anyone's help
    stuck = "stuck"  # engines run, but none can serve the current weights nor be refit: a bounded wait
    gone = "gone"  # no engine left that could ever come back: fail now


def _coming_back(state: EngineState, before: EngineState, weights_moved: bool, refit: Refit) -> bool:
    if state in (S.live, S.suspect, S.refitting):
        return True
    if state is S.restarting:  # it comes back holding the initial weights
        return not weights_moved or refit is not Refit.none
    if state is S.stale:  # a held source refits it next, unless that is what just failed
        return refit is Refit.pushed or (refit is Refit.held and before is not S.refitting)
    return False


def outlook(engines: Sequence[tuple[EngineState, EngineState]], *, weights_moved: bool, refit: Refit) -> Outlook:
    """Can the pool serve its current weights? ``engines``: each one's (state, the state it came from);
    ``weights_moved``: the pool's weights are no longer the initial ones."""
    if any(_coming_back(s, before, weights_moved, refit) for s, before in engines):
        return Outlook.serving
    if any(s in (S.restarting, S.stale) for s, _ in engines):
        return Outlook.stuck
    return Outlook.gone


@dataclass(frozen=True)
class EngineView:
    """What :func:`stuck_error` says about one engine: its name, state and why it is in it."""

    name: str
    state: EngineState
    why: str


def stuck_error(engines: Sequence[EngineView], version: int, refit: Refit, source: str | None,
                waited_s: float) -> str:
    """Why no engine can serve weight version ``version``, and how to fix it (a PoolError's text)."""
    out = "; ".join(f"{e.name} {e.state} ({e.why})" for e in engines if e.state is not S.retired)
    if refit is Refit.none:
        fix = ("load weights with pool.update_weights(version, source) (e.g. FolderWeights), not inside "
               "weight_update() or the gateway's /admin/reload_weights alone: the pool then refits a restarted "
               "engine from that source")
    else:
        fix = f"the refit from {source} failed: fix that source, or load working weights with pool.update_weights"
    return (f"no engine can serve weight version {version} and none can be refit (waited {waited_s:g} s, "
            f"pool.timeouts.hopeless_s): {out}. Fix: {fix}")
