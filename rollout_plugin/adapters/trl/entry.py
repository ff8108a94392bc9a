"""What ``rollout-plugin trl-grpo`` runs: a typed config in, a trained ``GRPOTrainer`` out.

The pool lives on the main process only (:func:`.ranks.make_pool`); other ranks get ``None`` and
take part in TRL's collectives through the backend. Errors in the ``trl:`` section are reported all at once, with the
nearest ``GRPOConfig`` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout_plugin.adapters.trl.config import Route, TrlGrpoConfig, WeightTransport, weights_problems
from rollout_plugin.adapters.trl.plan import apply_plan
from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.verify.runner import load_verifier

log = logging.getLogger(__name__)

RUN_SUMMARY = "rollout_pool_run.json"  # written into trl.output_dir by train(): what scripts/gpu_smoke.sh reads


def _load(key: str, path: str, kwargs: dict[str, Any] | None = None, call: bool = True) -> Any:
    try:
        obj = load_verifier(path)  # the same "pkg.module:name" resolution
    except Exception as exc:  # VerifierError names verify.verifier: rename it to this key
        raise ConfigError(ConfigProblem(key, path, str(exc).split(": ", 1)[-1])) from None
    return obj(**(kwargs or {})) if call else obj


def grpo_kwargs(cfg: TrlGrpoConfig, fields: dict[str, Any], planned: dict[str, Any] | None) -> dict[str, Any]:
    """``cfg.trl`` checked against GRPOConfig's fields, with CPU-friendly defaults and the planner's settings."""
    unknown = [k for k in cfg.trl if k not in fields]
    if unknown:
        raise ConfigError([ConfigProblem(f"trl.{k}", cfg.trl[k], "not a GRPOConfig field",
                                         next((f"trl.{n}=…" for n in difflib.get_close_matches(k, fields, 1)), None))
                           for k in unknown])
    if cfg.trl.get("use_vllm"):
        raise ConfigError(ConfigProblem("trl.use_vllm", cfg.trl["use_vllm"], "the rollout pool replaces TRL's own "
                                        "vLLM client; TRL must not start one", "trl.use_vllm=false"))
    kwargs = dict(cfg.trl)
    if cfg.apply_plan:
        kwargs, changes = apply_plan(kwargs, planned, fields)
        for line in changes or (["planner: nothing to change in the trainer settings"] if planned else []):
            print(f"trl-grpo: {line}")
    return kwargs


def planned_trl_kwargs(model_dir: str, num_generations: int, max_completion_length: int) -> dict[str, Any] | None:
    """The planner's TRL settings for this model on this machine (None when it cannot plan it)."""
    from rollout_plugin.tuning import load_hf_config, make_plan, trl_kwargs
    from rollout_plugin.tuning.spec import HARDWARE_PRESETS, WorkloadSpec

    try:
        model = load_hf_config(model_dir)
    except Exception as exc:  # a hub id without a local config.json: nothing to plan from
        log.info("planner skipped: cannot read %s/config.json (%s)", model_dir, exc)
        return None
    import torch

    hardware = HARDWARE_PRESETS["cpu"] if not torch.cuda.is_available() else None
    if hardware is None:
        name = torch.cuda.get_device_name(0).lower()
        hardware = next((h for key, h in HARDWARE_PRESETS.items() if key.split("-")[0] in name), None)
    if hardware is None:
        return None
    placement = "dedicated" if hardware.world_size >= 2 else "colocated"  # engines apart from the trainer if possible
    workload = WorkloadSpec(n=max(num_generations, 2), max_response_length=max_completion_length, placement=placement)
    try:
        return trl_kwargs(make_plan(model, hardware, workload))
    except ConfigError as exc:  # the planner cannot place this workload here: train with what the user gave
        log.info("planner skipped: %s", exc)
        return None


def engine_problems(cfg: TrlGrpoConfig, cuda: bool | None = None) -> list[ConfigProblem]:
    """What the engines lack for weight sync (launched engines only: attached ones are checked when attached)."""
    problems = weights_problems(cfg.weights, cfg.engine.colocate)
    launched = not cfg.engine.urls
    if launched and not cfg.engine.dev_mode:
        problems.append(ConfigProblem("engine.dev_mode", False, "weight sync goes through vLLM's dev endpoints",
                                      "engine.dev_mode=true"))
    if cfg.weights.transport is WeightTransport.nccl:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            problems.append(ConfigProblem("weights.transport", "nccl", "vLLM's NCCL weight transfer needs CUDA on "
                                          "the trainer and the engines", "weights.transport=folder"))
        if launched and "--weight-transfer-config" not in cfg.engine.extra_args:
            problems.append(ConfigProblem("engine.extra_args", list(cfg.engine.extra_args), "weights.transport=nccl "
                                          "needs engines with a weight-transfer engine",
                                          "engine.extra_args=[--weight-transfer-config,'{\"backend\": \"nccl\"}']"))
    return problems


def nccl_engine_utilization(cfg: TrlGrpoConfig, model_dir: str, inventory: Any) -> tuple[float | None, str]:
    """``engine.gpu_memory_utilization`` for launched engines that take weights over NCCL, when unset: vLLM's
    0.9 lowered until the transfer's receive buffers and layer-wise reload fit beside it (they live outside
    vLLM's budget). None: nothing to decide (set already, another transport, no GPU memory known)."""
    from rollout_plugin.tuning import HardwareSpec, load_hf_config
    from rollout_plugin.tuning.memory import nccl_update_bytes
    from rollout_plugin.tuning.planner import dedicated_utilization

    e, w = cfg.engine, cfg.weights
    if (w.transport is not WeightTransport.nccl or e.urls or e.gpu_memory_utilization is not None
            or not getattr(inventory, "memory_gib", None)):
        return None, ""
    try:
        model = load_hf_config(model_dir)
    except Exception:  # a hub id: no config.json here; count the buffers alone
        model = None
    update = nccl_update_bytes(model, tp=max(1, e.tensor_parallel_size), buffer_bytes=w.nccl_buffer_mib << 20,
                               num_buffers=w.nccl_num_buffers)
    return dedicated_utilization(HardwareSpec("local", inventory.memory_gib, 1), update)


def train(cfg: TrlGrpoConfig) -> Any:
    """Build the pool, dataset, rewards and trainer from ``cfg``, train, and return the trainer."""
    from trl import GRPOConfig, GRPOTrainer

    from rollout_plugin.adapters.trl import attach
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback
    from rollout_plugin.adapters.trl.ranks import make_pool
    from rollout_plugin.model.embedded import resolve_model

    problems = engine_problems(cfg)
    if problems:
        raise ConfigError(problems)
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    model_dir = resolve_model(cfg.trainer_model or cfg.engine.model, cfg.engine.python)
    planned = planned_trl_kwargs(model_dir, int(cfg.trl.get("num_generations", fields["num_generations"])),
                                 int(cfg.trl.get("max_completion_length", fields["max_completion_length"])))
    kwargs = grpo_kwargs(cfg, fields, planned)
    import torch

    if not torch.cuda.is_available():  # train in fp32 on CPU: bf16 Adam updates mostly round away
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("model_init_kwargs", {"dtype": "float32"})
    args = GRPOConfig(**kwargs)
    engine = dataclasses.replace(cfg.engine, model=model_dir) if not cfg.engine.urls else cfg.engine
    if cfg.weights.transport is WeightTransport.nccl and not engine.urls:
        from rollout_plugin.pool import gpu_inventory

        util, why = nccl_engine_utilization(cfg, model_dir, gpu_inventory())
        if util is not None:
            if util <= 0:
                raise ConfigError(ConfigProblem("weights.nccl_buffer_mib", cfg.weights.nccl_buffer_mib,
                                                f"the NCCL update does not fit beside the engine ({why})", 256))
            log.info("engine.gpu_memory_utilization unset -> %s (%s)", util, why)
            engine = dataclasses.replace(engine, gpu_memory_utilization=util)
    pool_cfg = cfg.pool if cfg.pool.k != 1 else dataclasses.replace(cfg.pool, k=args.num_generations)
    dataset = _load("dataset.path", cfg.dataset.path, cfg.dataset.kwargs)
    rewards: list[Callable] = [_load(f"rewards.{i}.path", r.path, r.kwargs, call=bool(r.kwargs))
                               for i, r in enumerate(cfg.rewards)]

    with make_pool(engine, pool_cfg, controller=cfg.controller) as pool:  # rank 0 only; None elsewhere
        if cfg.route is Route.backend:
            trainer = GRPOTrainer(model=model_dir, reward_funcs=rewards, args=args, train_dataset=dataset)
            attach(trainer, pool, weights=cfg.weights)
        else:
            cb = RolloutPoolCallback(pool, weights=cfg.weights)
            trainer = GRPOTrainer(model=model_dir, reward_funcs=rewards, args=args, train_dataset=dataset,
                                  callbacks=[cb], rollout_func=cb.rollout_func)
        initial = engine_weights(pool) if pool is not None else {}
        trainer.train()
        if pool is not None:
            write_run_summary(Path(args.output_dir) / RUN_SUMMARY, trainer, pool, initial)
    return trainer


def engine_weights(pool: Any) -> dict[str, dict[str, Any]]:
    """Per engine: its weight version (``/weight_info``) and one digest of its weight checksums
    (``/weight_checker``); None where the engine could not say (not in dev mode, no checker)."""
    versions = pool.run(lambda p: p.engine_rpc("/weight_info", method="GET"))
    sums = pool.run(lambda p: p.engine_rpc("/weight_checker", {"action": "checksum"}))
    out: dict[str, dict[str, Any]] = {a.engine: {"weight_version": (a.body or {}).get("weight_version") if a.ok
                                                 else None, "checksum": None} for a in versions}
    for a in sums:
        found = a.body.get("checksums") if a.ok and isinstance(a.body, dict) else None
        if found:
            digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]
            out.setdefault(a.engine, {"weight_version": None})["checksum"] = digest
    return out


def write_run_summary(path: Path, trainer: Any, pool: Any, initial: dict[str, dict[str, Any]]) -> None:
    """What the run did, for a script to check from a file rather than from log lines: steps, the pool's
    weight version, and each engine's version and weight digest now and before training."""
    final = engine_weights(pool)
    digests = {v["checksum"] for v in final.values()}
    summary = {
        "steps": trainer.state.global_step, "max_steps": trainer.args.max_steps,
        "pool_weight_version": pool.weight_version,
        "engines": {name: {**now, "initial_checksum": initial.get(name, {}).get("checksum")}
                    for name, now in final.items()},
        "checksums_agree": len(digests) == 1 and None not in digests,
        "weights_changed": all(v["checksum"] not in (None, initial.get(n, {}).get("checksum"))
                               for n, v in final.items()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    log.info("run summary: %s", path)
