"""Bounds and cross-field checks at the edge; every problem reported at once.

Each check names the dotted key, the value, why it is wrong and the nearest valid value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path

from rollout_plugin.config.schema import (
    EMBEDDED_MODEL,
    CollectConfig,
    EngineConfig,
    PoolBackend,
    PoolConfig,
    RayConfig,
    SamplingConfig,
)
from rollout_plugin.errors import ConfigError, ConfigProblem


class Problems:
    """Collects problems; :meth:`raise_if_any` raises them together as one :class:`ConfigError`."""

    def __init__(self) -> None:
        self.items: list[ConfigProblem] = []

    def add(self, key: str, value: object, reason: str, suggestion: object | None = None) -> None:
        self.items.append(ConfigProblem(key, value, reason, None if suggestion is None else f"{key}={suggestion}"))

    def at_least(self, key: str, value: float | None, low: float) -> None:
        if value is not None and value < low:
            self.add(key, value, f"must be >= {low}", low)

    def in_range(self, key: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
        if value is None:
            return
        if value > high or value < low or (low_open and value == low):
            nearest = high if value > high else (low if not low_open else _tiny_above(low))
            bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            self.add(key, value, f"must be in {bounds}", nearest)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _tiny_above(x: float) -> float:
    return round(x + 0.05, 2)


def nearest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The closest valid dotted key to a misspelt one, or None."""
    matches = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """All dotted keys a dataclass schema accepts (nested dataclasses flattened)."""
    out: list[str] = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out.extend(dotted_keys(type(default), key + "."))
        else:
            out.append(key)
    return out


def check_engine(cfg: EngineConfig, p: Problems, prefix: str = "engine", engines: int | None = None) -> None:
    p.in_range(f"{prefix}.gpu_memory_utilization", cfg.gpu_memory_utilization, 0.0, 1.0, low_open=True)
    p.at_least(f"{prefix}.max_model_len", cfg.max_model_len, 16)
    p.at_least(f"{prefix}.max_num_seqs", cfg.max_num_seqs, 1)
    p.at_least(f"{prefix}.tensor_parallel_size", cfg.tensor_parallel_size, 1)
    p.at_least(f"{prefix}.startup_timeout_s", cfg.startup_timeout_s, 1)
    p.at_least(f"{prefix}.cpu_kvcache_gb", cfg.cpu_kvcache_gb, 1)
    if cfg.port and not 1 <= cfg.port <= 65535:
        p.add(f"{prefix}.port", cfg.port, "must be 0 (pick a free port) or in [1, 65535]", 0)
    mnbt = cfg.max_num_batched_tokens
    if mnbt is not None and mnbt < cfg.max_model_len:
        # vLLM refuses this without chunked prefill, and throughput suffers with it (veRL/NeMo Gym guides).
        p.add(f"{prefix}.max_num_batched_tokens", mnbt, f"must be >= engine.max_model_len ({cfg.max_model_len})",
              max(cfg.max_model_len, 4096))
    for name in ("rpm", "tpm"):
        value = getattr(cfg.rate_limit, name)
        if value is not None and value <= 0:
            p.add(f"{prefix}.rate_limit.{name}", value, "must be > 0 per minute, or null for no limit", "null")
    p.at_least(f"{prefix}.rate_limit.burst_s", cfg.rate_limit.burst_s, 0.1)
    for url in cfg.urls:
        if not url.startswith(("http://", "https://")):
            p.add(f"{prefix}.urls", url, "must be an http:// or https:// base URL", f"[http://{url.split('://')[-1]}]")
    model = cfg.model
    if not cfg.urls and model != EMBEDDED_MODEL and _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            p.add(f"{prefix}.model", model, "no such model directory", EMBEDDED_MODEL)
        elif not (path / "config.json").is_file():
            p.add(f"{prefix}.model", model, "not a Hugging Face model directory (no config.json)", EMBEDDED_MODEL)
    check_placement(cfg, p, engines, prefix)


def check_placement(cfg: EngineConfig, p: Problems, engines: int | None = None, prefix: str = "engine") -> None:
    """What is wrong with a GPU layout before any GPU is counted (the inventory checks are in pool.placement)."""
    devices, trainer = [str(d) for d in cfg.devices], [str(d) for d in cfg.trainer_devices]
    for key, ids in (("devices", devices), ("trainer_devices", trainer)):
        twice = sorted({d for d in ids if ids.count(d) > 1})
        if twice:
            p.add(f"{prefix}.{key}", ids, f"lists GPU {','.join(twice)} more than once",
                  f"[{','.join(dict.fromkeys(ids))}]")
    tp, listed = cfg.tensor_parallel_size, list(dict.fromkeys(devices))
    if listed and tp > len(listed):
        p.add(f"{prefix}.tensor_parallel_size", tp, f"one engine needs {tp} GPUs; {prefix}.devices lists "
              f"{len(listed)}", len(listed))
    elif listed and tp >= 1 and len(listed) % tp:
        p.add(f"{prefix}.devices", devices, f"{len(listed)} GPUs do not split into engines of "
              f"engine.tensor_parallel_size={tp} GPUs each", f"[{','.join(listed[:len(listed) // tp * tp])}]")
    elif listed and engines is not None and tp >= 1 and engines * tp > len(listed):
        p.add("pool.engines", engines, f"{engines} engines × engine.tensor_parallel_size {tp} need "
              f"{engines * tp} GPUs; {prefix}.devices lists {len(listed)}", len(listed) // tp)
    shared = [d for d in dict.fromkeys(devices) if d in trainer]
    if shared and not cfg.colocate:
        rest = [d for d in dict.fromkeys(devices) if d not in trainer]
        p.add(f"{prefix}.devices", devices, f"GPU {','.join(shared)} also in {prefix}.trainer_devices: engines "
              f"never share the trainer's GPUs unless {prefix}.colocate=true", f"[{','.join(rest)}]")
    if "CUDA_VISIBLE_DEVICES" in cfg.env:
        value = cfg.env["CUDA_VISIBLE_DEVICES"]
        p.items.append(ConfigProblem(f"{prefix}.env.CUDA_VISIBLE_DEVICES", value, "the pool sets each engine's "
                                     "devices itself", f"{prefix}.devices=[{value}] without it in {prefix}.env"))
    if cfg.urls and (devices or trainer or cfg.colocate):
        key = "devices" if devices else ("trainer_devices" if trainer else "colocate")
        p.add(f"{prefix}.{key}", getattr(cfg, key), "engines attached by engine.urls run where they were "
              "started; placement applies to launched engines only", "[]" if key != "colocate" else False)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).exists() or model.count("/") != 1


def check_pool(cfg: PoolConfig, p: Problems, engines_known: int | None = None, prefix: str = "pool") -> None:
    p.at_least(f"{prefix}.engines", cfg.engines, 1)
    p.at_least(f"{prefix}.k", cfg.k, 1)
    p.at_least(f"{prefix}.per_engine", cfg.per_engine, 1)
    p.at_least(f"{prefix}.over_concurrency_ratio", cfg.over_concurrency_ratio, 1.0)
    p.at_least(f"{prefix}.max_concurrent", cfg.max_concurrent, 1)
    p.at_least(f"{prefix}.pack_size", cfg.pack_size, 1)
    p.at_least(f"{prefix}.groups.split_threshold", cfg.groups.split_threshold, 0.0)
    p.at_least(f"{prefix}.pack_timeout_s", cfg.pack_timeout_s, 0.0)
    p.at_least(f"{prefix}.affinity_max_keys", cfg.affinity_max_keys, 1)
    if cfg.affinity_ttl_s is not None and not cfg.affinity_ttl_s > 0:  # `not >`: NaN is refused too
        p.add(f"{prefix}.affinity_ttl_s", cfg.affinity_ttl_s, "must be > 0 seconds, or null for homes that never "
              "expire", 3600.0)
    p.at_least(f"{prefix}.max_retries", cfg.max_retries, 0)
    p.at_least(f"{prefix}.backoff_base_s", cfg.backoff_base_s, 0.0)
    p.at_least(f"{prefix}.max_restarts", cfg.max_restarts, 0)
    if cfg.metrics_port is not None and not 1 <= cfg.metrics_port <= 65535:
        p.add(f"{prefix}.metrics_port", cfg.metrics_port, "must be a TCP port in [1, 65535], or null for none", 9400)
    p.at_least(f"{prefix}.backoff_cap_s", cfg.backoff_cap_s, cfg.backoff_base_s)
    if cfg.per_engine is not None and cfg.k > cfg.per_engine:
        # A group goes to one engine as n=k; it could never be admitted.
        p.add(f"{prefix}.k", cfg.k, f"a group must fit one engine's cap (pool.per_engine={cfg.per_engine})",
              cfg.per_engine)
    p.at_least(f"{prefix}.prewarm.requests", cfg.prewarm.requests, 0)
    p.at_least(f"{prefix}.prewarm.max_tokens", cfg.prewarm.max_tokens, 1)
    if cfg.prewarm.timeout_s <= 0:
        p.add(f"{prefix}.prewarm.timeout_s", cfg.prewarm.timeout_s, "must be > 0", 120.0)
    for name in ("connect_s", "request_s", "admission_s", "health_s", "stall_s", "hopeless_s"):
        value = getattr(cfg.timeouts, name)
        if value <= 0:
            p.add(f"{prefix}.timeouts.{name}", value, "must be > 0", getattr(type(cfg.timeouts)(), name))
    check_ray(cfg.ray, p, f"{prefix}.ray", cfg.engines)


def check_ray(cfg: RayConfig, p: Problems, prefix: str = "pool.ray", engines: int | None = None) -> None:
    p.at_least(f"{prefix}.num_cpus", cfg.num_cpus, 0.0)
    p.at_least(f"{prefix}.num_gpus", cfg.num_gpus, 0.0)
    # One slot waits on the engine's lifetime for as long as it runs; stop needs another.
    p.at_least(f"{prefix}.max_concurrency", cfg.max_concurrency, 2)
    p.at_least(f"{prefix}.replace_timeout_s", cfg.replace_timeout_s, 1.0)
    p.at_least(f"{prefix}.node_poll_s", cfg.node_poll_s, 0.1)
    if engines is not None:
        p.at_least(f"{prefix}.max_engines", cfg.max_engines, engines)
    for name, amount in cfg.resources.items():
        if amount <= 0:
            p.add(f"{prefix}.resources.{name}", amount, "must be > 0 (drop the key to ask for none)", 1)
    for node in cfg.nodes:
        if not node or node in ("CPU", "GPU", "memory", "object_store_memory"):
            p.add(f"{prefix}.nodes", node, "must name a custom resource a node advertises "
                  "(ray start --resources='{\"node_a\": 1}')", "[node_a]")


def check_sampling(cfg: SamplingConfig, p: Problems, max_model_len: int | None = None,
                   prefix: str = "sampling") -> None:
    p.at_least(f"{prefix}.max_tokens", cfg.max_tokens, 1)
    p.at_least(f"{prefix}.temperature", cfg.temperature, 0.0)
    p.in_range(f"{prefix}.top_p", cfg.top_p, 0.0, 1.0, low_open=True)
    p.at_least(f"{prefix}.min_tokens", cfg.min_tokens, 0)
    if cfg.min_tokens > cfg.max_tokens:
        p.add(f"{prefix}.min_tokens", cfg.min_tokens, f"exceeds sampling.max_tokens ({cfg.max_tokens})",
              cfg.max_tokens)
    if max_model_len is not None and cfg.max_tokens >= max_model_len:
        p.add(f"{prefix}.max_tokens", cfg.max_tokens,
              f"leaves no room for the prompt in engine.max_model_len ({max_model_len})", max_model_len // 2)


def check_controller(cfg: CollectConfig, p: Problems, prefix: str = "controller") -> None:
    c = cfg.controller
    p.at_least(f"{prefix}.interval_s", c.interval_s, 0.05)
    p.at_least(f"{prefix}.quiet_interval_s", c.quiet_interval_s, c.interval_s)
    p.at_least(f"{prefix}.min_cap", c.min_cap, 1)
    p.at_least(f"{prefix}.max_cap", c.max_cap, max(1, c.min_cap))
    p.in_range(f"{prefix}.kv_high", c.kv_high, 0.0, 1.0, low_open=True)
    p.at_least(f"{prefix}.raise_factor", c.raise_factor, 1.01)
    p.in_range(f"{prefix}.cut_factor", c.cut_factor, 0.05, 0.99)
    p.in_range(f"{prefix}.at_cap_fraction", c.at_cap_fraction, 0.1, 1.0)
    p.at_least(f"{prefix}.trial_s", c.trial_s, c.interval_s)  # a trial spans at least one observation
    p.in_range(f"{prefix}.cut_tolerance", c.cut_tolerance, 0.0, 0.9)
    p.in_range(f"{prefix}.raise_tolerance", c.raise_tolerance, 0.0, 0.9)
    p.at_least(f"{prefix}.cheap_s", c.cheap_s, 0.0)
    p.at_least(f"{prefix}.probe_factor", c.probe_factor, 1.01)
    p.at_least(f"{prefix}.reprobe_s", c.reprobe_s, 0.0)
    p.at_least(f"{prefix}.expected_tokens", c.expected_tokens, 1)
    p.in_range(f"{prefix}.max_scrape_lag", c.max_scrape_lag, 0.0, 1.0)
    p.in_range(f"{prefix}.slow_below", c.slow_below, 0.05, 0.95)
    p.at_least(f"{prefix}.pack.window_s", c.pack.window_s, 0.1)
    p.at_least(f"{prefix}.pack.min_gain", c.pack.min_gain, 0.0)
    p.in_range(f"{prefix}.pack.decay", c.pack.decay, 0.0, 1.0, low_open=True)
    p.at_least(f"{prefix}.pack.reprobe_every", c.pack.reprobe_every, 1)


def validate_collect(cfg: CollectConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem in a collect config."""
    p = Problems()
    check_engine(cfg.engine, p, engines=cfg.pool.engines)
    check_pool(cfg.pool, p)
    if cfg.pool.backend == PoolBackend.ray and (cfg.engine.devices or cfg.engine.trainer_devices):
        p.add("engine.devices" if cfg.engine.devices else "engine.trainer_devices",
              cfg.engine.devices or cfg.engine.trainer_devices, "pool.backend=ray: Ray gives each replica its "
              "GPUs (pool.ray.num_gpus, pool.ray.resources)", "[]")
    if cfg.pool.backend == PoolBackend.ray and cfg.engine.urls:
        p.add("pool.backend", "ray", "launches engines, but engine.urls attaches to running ones; unset one",
              "local")
    check_sampling(cfg.sampling, p, cfg.engine.max_model_len)
    check_controller(cfg, p)
    p.at_least("verify.workers", cfg.verify.workers, 1)
    p.at_least("verify.cache_size", cfg.verify.cache_size, 0)
    p.at_least("limit", cfg.limit, 1)
    if cfg.overwrite and cfg.resume:
        p.add("resume", cfg.resume, "cannot be combined with overwrite=true", False)
    p.raise_if_any()
