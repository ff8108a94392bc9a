"""The ``plan`` command's typed Hydra config, and its translation into the planner's frozen specs.

Hydra needs mutable dataclasses it can override; the planner wants frozen ones. ``model=…`` and
``hardware=…`` pick a preset (``hydra_conf/model/``, ``hydra_conf/hardware/``); any field set here
wins over the preset (user-set values win). ``model.path`` (an HF directory or its config.json) is
read by the CLI through :mod:`rollout_plugin.tuning.loader` and passed in as ``loaded``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, cast

from rollout_plugin.config.validate import Problems
from rollout_plugin.tuning.spec import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec, Pins, WorkloadSpec



# Modes are str-Enums, not Literal, in this Hydra-facing layer: OmegaConf 2.3 rejects Literal annotations
# (the frozen specs keep Literal). An Enum still gets Hydra's "expected one of [...]" check.
class Emit(str, Enum):
    table = "table"
    verl = "verl"
    trl = "trl"
    vllm = "vllm"
    pool = "pool"
    all = "all"


class Placement(str, Enum):
    colocated = "colocated"
    dedicated = "dedicated"


class AdvEstimator(str, Enum):
    grpo = "grpo"
    gae = "gae"


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # a name in MODEL_PRESETS (set by model=<name>)
    path: Optional[str] = None  # HF model directory or config.json; wins over the preset
    dtype: Optional[str] = None  # bfloat16, float16, float32 or fp8; unset: the preset's or config.json's
    num_layers: Optional[int] = None  # decoder layers; this and each figure below, set, win over the preset's
    hidden_size: Optional[int] = None  # model width
    num_heads: Optional[int] = None  # attention (query) heads
    num_kv_heads: Optional[int] = None  # key/value heads (GQA): sets the KV cache's bytes per token
    head_dim: Optional[int] = None  # per head
    intermediate_size: Optional[int] = None  # MLP width
    vocab_size: Optional[int] = None  # tokenizer vocabulary (embedding and logits memory)
    num_params: Optional[int] = None  # parameter count; unset: the preset's, or estimated from the shape
    max_position_embeddings: Optional[int] = None  # the model's context; prompt + response must fit it


@dataclass
class HardwareConfig:
    preset: Optional[str] = None  # a name in HARDWARE_PRESETS (set by hardware=<name>)
    gpu_memory_gib: Optional[float] = None  # per GPU, as nvidia-smi reports it; unset: the preset's
    gpus_per_node: Optional[int] = None  # unset: the preset's
    nodes: Optional[int] = None  # unset: the preset's (1)
    kind: Optional[str] = None  # gpu | cpu


@dataclass
class WorkloadConfig:
    max_prompt_length: int = 1024  # tokens (verl's data.max_prompt_length)
    max_response_length: int = 1024  # tokens (verl's data.max_response_length)
    n: int = 8  # samples per prompt (GRPO group size)
    train_batch_size: int = 256  # prompts per step, as verl's data.train_batch_size
    ppo_mini_batch_size: int = 64  # prompts per optimizer step; divides train_batch_size
    placement: Placement = Placement.colocated  # colocated: rollout and training share every GPU; dedicated: split
    rollout_gpus: Optional[int] = None  # dedicated: GPUs for the engines, the rest train; unset: half
    offload: bool = False  # FSDP parameter and optimizer offload to CPU
    adv_estimator: AdvEstimator = AdvEstimator.grpo  # gae trains a critic too


@dataclass
class PinConfig:
    gpu_memory_utilization: Optional[float] = None  # each pin, when set, is kept; the rest is planned around it
    tensor_parallel_size: Optional[int] = None  # GPUs per engine
    max_num_seqs: Optional[int] = None  # the engine's scheduler cap (= the pool's per-engine cap)
    ulysses_sp: Optional[int] = None  # the actor's Ulysses sequence parallelism
    over_concurrency_ratio: float = 1.2  # Xtuner's: samples in flight per engine = cap × this


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    pin: PinConfig = field(default_factory=PinConfig)
    emit: Emit = Emit.table  # table, verl (overrides), trl (GRPOConfig), vllm (serve args), pool (config) or all
    log_level: str = "WARNING"  # DEBUG, INFO, WARNING or ERROR


def register_plan_configs() -> None:
    """Register the plan schema in Hydra's ConfigStore (idempotent; distinct from collect's names)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _override(spec: object, cfg: object, names: list[str]) -> object:
    changes = {n: getattr(cfg, n) for n in names if getattr(cfg, n) is not None}
    return dataclasses.replace(spec, **changes) if changes else spec  # type: ignore[type-var]


_MODEL_FIELDS = ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "vocab_size", "num_params", "max_position_embeddings", "dtype"]


def to_specs(cfg: PlanConfig, loaded: Optional[ModelSpec] = None) -> tuple[ModelSpec, HardwareSpec, WorkloadSpec,
                                                                           Pins]:
    """Frozen specs from the composed config; unknown presets are reported with the nearest name."""
    p = Problems()
    model: Optional[ModelSpec] = loaded
    if model is None:
        if cfg.model.preset in MODEL_PRESETS:
            model = MODEL_PRESETS[cfg.model.preset]
        else:
            p.add("model", cfg.model.preset, "unknown model preset (or give model.path=<HF dir>)",
                  _near(cfg.model.preset, MODEL_PRESETS))
    hardware: Optional[HardwareSpec] = None
    if cfg.hardware.preset in HARDWARE_PRESETS:
        hardware = HARDWARE_PRESETS[cfg.hardware.preset]
    elif cfg.hardware.preset is None and None not in (cfg.hardware.gpu_memory_gib, cfg.hardware.gpus_per_node):
        hardware = HardwareSpec("custom", 1.0, 1)
    else:
        p.add("hardware", cfg.hardware.preset, "unknown hardware preset (or set hardware.gpu_memory_gib and "
              "hardware.gpus_per_node)", _near(cfg.hardware.preset, HARDWARE_PRESETS))
    if model is not None and cfg.model.dtype is not None and cfg.model.dtype not in ("bfloat16", "float16",
                                                                                      "float32", "fp8"):
        p.add("model.dtype", cfg.model.dtype, "must be one of bfloat16, float16, float32, fp8", "bfloat16")
    if cfg.hardware.kind not in (None, "gpu", "cpu"):
        p.add("hardware.kind", cfg.hardware.kind, "must be gpu or cpu", "gpu")
    p.raise_if_any()
    # Both are set here: a missing one added a problem and raise_if_any raised.
    model = _override(cast(ModelSpec, model), cfg.model, _MODEL_FIELDS)  # type: ignore[assignment]
    hardware = _override(cast(HardwareSpec, hardware), cfg.hardware,  # type: ignore[assignment]
                         ["gpu_memory_gib", "gpus_per_node", "nodes", "kind"])
    workload = WorkloadSpec(**{k: v.value if isinstance(v, Enum) else v
                               for k, v in dataclasses.asdict(cfg.workload).items()})
    pins = Pins(**dataclasses.asdict(cfg.pin))
    return model, hardware, workload, pins  # type: ignore[return-value]


def _near(name: Optional[str], choices: dict) -> str:
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.3)
    return match[0] if match else "|".join(choices)
