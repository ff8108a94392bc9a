"""The planner's trainer settings applied to a ``GRPOConfig``'s keyword arguments (user-set values win).

Pure: dicts in, dicts and human-readable changes out. Only the settings the issue calls trainer
settings are taken: gradient checkpointing and the micro-batch shape.
"""

from __future__ import annotations

from typing import Any

TRAINER_KEYS = ("gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps")


def apply_plan(trl_kwargs: dict[str, Any], planned: dict[str, Any] | None,
               defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``trl_kwargs`` with the planner's trainer settings filled where the user set nothing.

    ``defaults`` are TRL's own defaults (to say what changed); returns the new kwargs and one line per change."""
    out = dict(trl_kwargs)
    changes: list[str] = []
    if not planned:
        return out, changes
    for key in TRAINER_KEYS:
        if key in out or key not in planned:
            continue  # the user's value wins, and the planner may have nothing to say
        old = (defaults or {}).get(key, "<TRL default>")
        out[key] = planned[key]
        if old != planned[key]:
            changes.append(f"trl.{key}: {old} -> {planned[key]} (planner)")
    return out, changes
