"""Engine profiles: how long one continuous-batching step takes, and how big the engine is.

A step decodes one token for every running sequence and prefills the prompts admitted with it:

    step_s = base_s + per_seq_s · running + per_ctx_token_s · context_tokens
             + per_prefill_token_s · prefill_tokens + per_admit_s · admitted

(``context_tokens``: tokens held in KV by the running sequences, read by attention each step;
``admitted``: sequences that joined this step — what a request costs outside the GPU: HTTP,
tokenizing, scheduling). Linear in its five coefficients, so a profile is fitted by least squares on measured makespans
(:mod:`rollout_plugin.sim.calibrate`). Profiles ship as JSON in ``rollout_plugin/sim/profiles/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rollout_plugin.errors import SimulationError


@dataclass(frozen=True)
class StepModel:
    base_s: float
    per_seq_s: float
    per_ctx_token_s: float
    per_prefill_token_s: float
    per_admit_s: float = 0.0

    def seconds(self, running: int, context_tokens: float, prefill_tokens: float, admitted: int = 0) -> float:
        return (self.base_s + self.per_seq_s * running + self.per_ctx_token_s * context_tokens
                + self.per_prefill_token_s * prefill_tokens + self.per_admit_s * admitted)


@dataclass(frozen=True)
class EngineProfile:
    name: str
    step: StepModel
    kv_tokens: int  # KV-cache capacity
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int = 16
    source: str = ""
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # A weight update: the model's bytes over the trainer-to-engine transfer bandwidth (0: instant).
    weight_bytes: float = 0.0
    weight_transfer_bytes_per_s: float = 0.0

    @property
    def weight_load_s(self) -> float:
        return self.weight_bytes / self.weight_transfer_bytes_per_s if self.weight_transfer_bytes_per_s else 0.0


def builtin_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rollout_plugin.sim.profiles").iterdir()
                  if p.name.endswith(".json"))


def profile_from_dict(data: dict[str, Any]) -> EngineProfile:
    try:
        eng, step = data["engine"], data["step"]
        return EngineProfile(
            name=data["name"],
            step=StepModel(float(step["base_s"]), float(step["per_seq_s"]), float(step["per_ctx_token_s"]),
                           float(step["per_prefill_token_s"]), float(step.get("per_admit_s", 0.0))),
            kv_tokens=int(eng["kv_tokens"]), max_num_seqs=int(eng["max_num_seqs"]),
            max_num_batched_tokens=int(eng["max_num_batched_tokens"]), block_size=int(eng.get("block_size", 16)),
            source=str(data.get("source", "")), calibration=dict(data.get("calibration", {})),
            weight_bytes=float(eng.get("weight_bytes", 0.0)),
            weight_transfer_bytes_per_s=float(eng.get("weight_transfer_bytes_per_s", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SimulationError(f"malformed engine profile {data.get('name', '?')!r}: {exc!r} "
                              f"(needs name, engine.{{kv_tokens,max_num_seqs,max_num_batched_tokens}}, "
                              f"step.{{base_s,per_seq_s,per_ctx_token_s,per_prefill_token_s[,per_admit_s]}})") from None


def load_profile(name_or_path: str) -> EngineProfile:
    """A built-in profile by name (``cpu_tiny``, ``h100_llama8b``) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        known = builtin_profiles()
        if name_or_path not in known:
            raise SimulationError(f"sim.profile={name_or_path!r}: no such profile file or built-in profile "
                                  f"(built-in: {', '.join(known)})")
        text = resources.files("rollout_plugin.sim.profiles").joinpath(f"{name_or_path}.json").read_text()
    return profile_from_dict(json.loads(text))
