"""OmegaConf resolvers that fill verl's keys from the planner, given the user's own verl values.

``hydra_conf/rollout_pool/*.yaml`` set verl keys to ``${rollout_pool.tuned:NAME}``. Resolving one reads
the job's shape from the user's config (``data.*``, ``rollout.n``, ``actor.ppo_mini_batch_size``,
``trainer.n_gpus_per_node × nnodes``, the model at ``actor_rollout_ref.model.path``, offload, the
advantage estimator, ``hybrid_engine``) plus ``rollout_pool.hardware``, calls the planner
(:func:`rollout_plugin.tuning.make_plan`, cached) and returns one value. A key the user sets on the
command line replaces our interpolation (user-set values win); four of them — TP, memory utilization,
max_num_seqs, Ulysses SP — are also passed to the planner as pins so the rest is planned around them.
Values derived from other values (log-prob micro-batches = 2 × the training micro-batch, as far as the
memory model's forward budget holds, …) read the *final* value of their source, so they follow a user's
override too.

Registered by the ``verl.plugins`` entry point (:mod:`.plugin`), which ``import verl`` loads in the
driver and in every Ray worker.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.tuning import HARDWARE_PRESETS, MODEL_PRESETS, Pins, WorkloadSpec, load_hf_config, make_plan
from rollout_plugin.tuning.normalize import log_prob_micro
from rollout_plugin.tuning.planner import Plan
from rollout_plugin.tuning.spec import HardwareSpec, ModelSpec

NAMESPACE = "rollout_pool"
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"
ROUTER_YAML = Path(__file__).with_name("router.yaml")


def _get(root: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(root, key, default=default)


def _pinned(root: DictConfig, key: str) -> Any:
    """The user's value for ``key`` if they set one (anything but our interpolation), else None."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(root, parent_key)
    # keys() and is_interpolation() do not resolve (``in`` would, and recurse into this very resolver).
    if not isinstance(parent, DictConfig) or leaf not in parent.keys() or OmegaConf.is_interpolation(parent, leaf):
        return None
    return parent[leaf]


def model_spec(path: Optional[str], preset: Optional[str]) -> ModelSpec:
    """The planner's model: ``rollout_pool.model`` (a preset), a local HF directory, or a preset's hub id."""
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(ConfigProblem(f"{NAMESPACE}.model", preset, "unknown model preset",
                                            f"{NAMESPACE}.model={_near(preset, MODEL_PRESETS)}"))
        return dataclasses.replace(MODEL_PRESETS[preset], path=path or MODEL_PRESETS[preset].path)
    if not path:
        raise ConfigError(ConfigProblem("actor_rollout_ref.model.path", path, "not set: the planner sizes "
                                        "everything from the model", "actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct"))
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return load_hf_config(str(local))
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for spec in MODEL_PRESETS.values():
        if path.lower() == spec.path.lower() or base == spec.path.rsplit("/", 1)[-1].lower() or base == spec.name:
            return dataclasses.replace(spec, path=path)
    for spec in MODEL_PRESETS.values():  # a base or fine-tuned variant of a preset ("Qwen2.5-7B", "…-Math")
        if base.startswith(spec.name + "-") or base.startswith(spec.path.rsplit("/", 1)[-1].lower().rsplit("-", 1)[0]):
            return dataclasses.replace(spec, path=path)
    raise ConfigError(ConfigProblem("actor_rollout_ref.model.path", path,
                                    "neither a local HF model directory (config.json) nor a known hub id",
                                    f"{NAMESPACE}.model={_near(base, MODEL_PRESETS)} (or a local directory)"))


def _near(name: str, choices: dict) -> str:
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.3)
    return match[0] if match else "|".join(choices)


def specs_from_verl(root: DictConfig) -> tuple[ModelSpec, HardwareSpec, WorkloadSpec, Pins]:
    """The planner's inputs, read from a composed verl config."""
    if not isinstance(OmegaConf.select(root, "data"), DictConfig) or not isinstance(OmegaConf.select(root, "trainer"),
                                                                                    DictConfig):
        # A section resolved apart from its config would silently plan from defaults.
        raise ConfigError(ConfigProblem(NAMESPACE, None, "resolved outside a whole verl config (no data/trainer "
                                        "sections): resolve the full config before taking sections out"))
    problems: list[ConfigProblem] = []
    hw_name = _get(root, f"{NAMESPACE}.hardware", "h100-80")
    if hw_name not in HARDWARE_PRESETS:
        problems.append(ConfigProblem(f"{NAMESPACE}.hardware", hw_name, "unknown hardware preset",
                                      f"{NAMESPACE}.hardware={_near(hw_name, HARDWARE_PRESETS)}"))
        hw_name = "h100-80"  # plan on, so the batch problems are reported in the same run
    hardware = dataclasses.replace(HARDWARE_PRESETS[hw_name], gpus_per_node=int(_get(root, "trainer.n_gpus_per_node", 8)),
                                   nodes=int(_get(root, "trainer.nnodes", 1)))
    try:
        model = model_spec(_get(root, "actor_rollout_ref.model.path"), _get(root, f"{NAMESPACE}.model"))
    except ConfigError as exc:
        problems += exc.problems
        model = MODEL_PRESETS["qwen2.5-7b"]
    colocated = bool(_get(root, "actor_rollout_ref.hybrid_engine", True))
    rollout_gpus = None
    if not colocated:
        rollout_gpus = int(_get(root, f"{ROLLOUT}.n_gpus_per_node", 0) or 0) * int(_get(root, f"{ROLLOUT}.nnodes", 0) or 0)
    workload = WorkloadSpec(
        max_prompt_length=int(_get(root, "data.max_prompt_length", 1024)),
        max_response_length=int(_get(root, "data.max_response_length", 1024)),
        n=int(_get(root, f"{ROLLOUT}.n", 1)),
        train_batch_size=int(_get(root, "data.train_batch_size", 256)),
        ppo_mini_batch_size=int(_get(root, f"{ACTOR}.ppo_mini_batch_size", 64)),
        placement="colocated" if colocated else "dedicated",
        rollout_gpus=rollout_gpus or None,
        offload=bool(_get(root, f"{ACTOR}.fsdp_config.param_offload", False)),
        adv_estimator="gae" if _get(root, "algorithm.adv_estimator") == "gae" else "grpo",
    )
    pins = Pins(gpu_memory_utilization=_pinned(root, f"{ROLLOUT}.gpu_memory_utilization"),
                tensor_parallel_size=_pinned(root, f"{ROLLOUT}.tensor_model_parallel_size"),
                max_num_seqs=_pinned(root, f"{ROLLOUT}.max_num_seqs"),
                ulysses_sp=_pinned(root, f"{ACTOR}.ulysses_sequence_parallel_size"),
                over_concurrency_ratio=float(_get(root, f"{NAMESPACE}.router.over_concurrency_ratio", 1.2)))
    if problems:
        raise _SpecError(problems, (model, hardware, workload, pins))
    return model, hardware, workload, pins


class _SpecError(ConfigError):
    """Problems in the planner's inputs, carrying stand-in specs so the planner can still report its own."""

    def __init__(self, problems: list[ConfigProblem], specs: tuple[ModelSpec, HardwareSpec, WorkloadSpec, Pins]):
        super().__init__(problems)
        self.specs = specs


# The planner's keys, as the user wrote them on verl's command line.
VERL_KEYS = {
    "workload.train_batch_size": "data.train_batch_size",
    "workload.ppo_mini_batch_size": f"{ACTOR}.ppo_mini_batch_size",
    "workload.n": f"{ROLLOUT}.n",
    "workload.max_prompt_length": "data.max_prompt_length",
    "workload.max_response_length": "data.max_response_length",
    "workload.offload": f"{ACTOR}.fsdp_config.param_offload",
    "workload.placement": "actor_rollout_ref.hybrid_engine",
    "workload.rollout_gpus": f"{ROLLOUT}.n_gpus_per_node",
    "pin.gpu_memory_utilization": f"{ROLLOUT}.gpu_memory_utilization",
    "pin.tensor_parallel_size": f"{ROLLOUT}.tensor_model_parallel_size",
    "pin.max_num_seqs": f"{ROLLOUT}.max_num_seqs",
    "pin.ulysses_sp": f"{ACTOR}.ulysses_sequence_parallel_size",
    "pin.over_concurrency_ratio": f"{NAMESPACE}.router.over_concurrency_ratio",
    "hardware.gpus_per_node": "trainer.n_gpus_per_node",
    "hardware.nodes": "trainer.nnodes",
    "hardware.gpu_memory_gib": f"{NAMESPACE}.hardware",
    "hardware": f"{NAMESPACE}.hardware",
    "model": "actor_rollout_ref.model.path",
}


def _in_verl_terms(problem: ConfigProblem) -> ConfigProblem:
    def translate(text: str) -> str:
        for ours, theirs in sorted(VERL_KEYS.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w.]){re.escape(ours)}(?![\w])", theirs, text)
        return text

    suggestion = problem.suggestion and problem.suggestion.replace(
        "workload.placement=dedicated", "actor_rollout_ref.hybrid_engine=false (a standalone rollout pool)")
    return ConfigProblem(VERL_KEYS.get(problem.key, problem.key), problem.value, translate(problem.reason),
                         translate(suggestion) if suggestion else None)


@functools.lru_cache(maxsize=64)
def _cached_plan(model: ModelSpec, hardware: HardwareSpec, workload: WorkloadSpec, pins: Pins) -> Plan:
    return make_plan(model, hardware, workload, pins)


def plan_for(root: DictConfig) -> Plan:
    """The planner's plan for this verl config (raises :class:`ConfigError` listing every problem).

    ``rollout_pool.min_ulysses_sp`` and ``rollout_pool.per_engine_scale`` (the ``long_context`` group)
    re-plan with those pins, unless the user pinned the value themselves.
    """
    found: list[ConfigProblem] = []
    try:
        specs = specs_from_verl(root)
    except _SpecError as exc:
        found, specs = list(exc.problems), exc.specs
    try:
        plan = _replan(root, *specs)
    except ConfigError as exc:
        found += exc.problems
    if found:
        raise ConfigError([_in_verl_terms(p) for p in found]) from None
    return plan


def _replan(root: DictConfig, model: ModelSpec, hardware: HardwareSpec, workload: WorkloadSpec, pins: Pins) -> Plan:
    plan = _cached_plan(model, hardware, workload, pins)
    changes: dict[str, int] = {}
    min_sp = int(_get(root, f"{NAMESPACE}.min_ulysses_sp", 1) or 1)
    if pins.ulysses_sp is None and plan.verl.ulysses_sp < min_sp:
        changes["ulysses_sp"] = min_sp
    scale_by = _get(root, f"{NAMESPACE}.per_engine_scale")
    if pins.max_num_seqs is None and scale_by is not None and float(scale_by) < 1:
        smaller = int(plan.engine.max_num_seqs * float(scale_by))
        changes["max_num_seqs"] = max(workload.n, smaller // 8 * 8 if smaller >= 8 else smaller)
    if changes:
        plan = _cached_plan(model, hardware, workload, dataclasses.replace(pins, **changes))
    return plan


def _dp(root: DictConfig) -> int:
    world = int(_get(root, "trainer.n_gpus_per_node", 1)) * int(_get(root, "trainer.nnodes", 1))
    return max(1, world // max(1, int(_get(root, f"{ACTOR}.ulysses_sequence_parallel_size", 1) or 1)))


def _train_micro_per_gpu(root: DictConfig) -> Optional[int]:
    """The final training micro-batch per GPU: the per-GPU key, or the user's global one normalized."""
    per_gpu = _get(root, f"{ACTOR}.ppo_micro_batch_size_per_gpu")
    if per_gpu is not None:
        return int(per_gpu)
    total = _get(root, f"{ACTOR}.ppo_micro_batch_size")
    return None if total is None else max(1, int(total) // _dp(root))


def _log_prob_micro(root: DictConfig, section: str) -> Optional[int]:
    if _get(root, f"{section}.log_prob_micro_batch_size") is not None:
        return None  # the user set the global form; verl refuses both
    micro = _train_micro_per_gpu(root)
    if micro is None:
        return None
    # Forward-only: twice the final training micro-batch, as far as the memory model's forward budget holds.
    sp = max(1, int(_get(root, f"{ACTOR}.ulysses_sequence_parallel_size", 1) or 1))
    seq = int(_get(root, "data.max_prompt_length", 1024)) + int(_get(root, "data.max_response_length", 1024))
    return log_prob_micro(micro, plan_for(root).verl.log_prob_token_budget, -(-seq // sp))


def _critic(field: str) -> Callable[[DictConfig, Optional[str]], Any]:
    def value(root: DictConfig, _: Optional[str]) -> Any:
        return getattr(plan_for(root).verl, field) if _get(root, "algorithm.adv_estimator") == "gae" else None
    return value


# name -> f(root, section argument): each a value the planner decides, or one derived from a final value.
TUNED: dict[str, Callable[[DictConfig, Optional[str]], Any]] = {
    "micro_batch_per_gpu": lambda r, _: (None if _get(r, f"{ACTOR}.ppo_micro_batch_size") is not None
                                         else plan_for(r).verl.micro_batch_per_gpu),
    "ppo_max_token_len_per_gpu": lambda r, _: plan_for(r).verl.ppo_max_token_len_per_gpu,
    "ulysses_sp": lambda r, _: plan_for(r).verl.ulysses_sp,
    "log_prob_micro_batch_per_gpu": lambda r, section: _log_prob_micro(r, section or ROLLOUT),
    # From the memory model's forward budget, not 2× the training budget (which already fills the GPU).
    "log_prob_max_token_len_per_gpu": lambda r, _: plan_for(r).verl.log_prob_max_token_len_per_gpu,
    "tensor_parallel_size": lambda r, _: plan_for(r).engine.tensor_parallel_size,
    "gpu_memory_utilization": lambda r, _: plan_for(r).engine.gpu_memory_utilization,
    "max_model_len": lambda r, _: plan_for(r).engine.max_model_len,
    # Never below max_model_len, whatever the user set it to: a whole prompt prefills in one step.
    "max_num_batched_tokens": lambda r, _: max(plan_for(r).engine.max_num_batched_tokens,
                                               int(_get(r, f"{ROLLOUT}.max_model_len") or 0)),
    "max_num_seqs": lambda r, _: plan_for(r).engine.max_num_seqs,
    "enable_prefix_caching": lambda r, _: plan_for(r).engine.enable_prefix_caching,
    "critic_micro_batch_per_gpu": _critic("critic_micro_batch_per_gpu"),
    "critic_forward_micro_batch_per_gpu": _critic("critic_forward_micro_batch_per_gpu"),
    "critic_ppo_max_token_len_per_gpu": _critic("critic_ppo_max_token_len_per_gpu"),
    "critic_forward_max_token_len_per_gpu": _critic("critic_forward_max_token_len_per_gpu"),
}


def tuned(name: str, section: Optional[str] = None, *, _root_: DictConfig) -> Any:
    if name not in TUNED:
        raise ConfigError(ConfigProblem(f"${{{NAMESPACE}.tuned:{name}}}", name, "unknown tuned value",
                                        _near(name, TUNED)))
    return TUNED[name](_root_, section)


def router_yaml() -> str:
    """The router YAML shipped in the package (an absolute path, found the same on every node)."""
    return str(ROUTER_YAML)


def register() -> None:
    """Register the resolvers (idempotent: the entry point may be loaded more than once)."""
    for name, fn in ((f"{NAMESPACE}.tuned", tuned), (f"{NAMESPACE}.router_yaml", router_yaml)):
        OmegaConf.register_new_resolver(name, fn, replace=True)
