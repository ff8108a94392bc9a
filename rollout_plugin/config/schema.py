"""Typed configs for the pool, the engines and the `collect` job.

Plain dataclasses (no torch, no vllm) registered in Hydra's ConfigStore, so YAML under
``hydra_conf/`` and ``key=value`` overrides are type-checked against them. Bounds and cross-field
rules live in :mod:`rollout_plugin.config.validate`, which reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

EMBEDDED_MODEL = "embedded:tiny-llama"


# Modes are str-Enums rather than typing.Literal: OmegaConf 2.3 rejects Literal annotations, and an
# Enum still gives Hydra-level checking ("Invalid value 'x', expected one of [auto, off]").
class CpuBind(str, Enum):
    auto = "auto"
    off = "off"


# Functional API because "async" is a keyword; OmegaConf matches enum members by name.
ExecutorKind = Enum("ExecutorKind", {"thread": "thread", "process": "process", "async": "async"}, type=str)
ExecutorKind.__doc__ = "thread: I/O-bound or cheap verifiers; process: CPU-bound; async: remote calls (async def)."


class VerifyTiming(str, Enum):
    inline = "inline"  # score beside generation
    deferred = "deferred"  # write unverified rollouts; `rollout-plugin verify` scores them later


class VerifyMode(str, Enum):
    fast = "fast"
    exact = "exact"


class PoolBackend(str, Enum):
    local = "local"  # engine processes on this machine
    ray = "ray"  # one Ray actor per engine, on the cluster the caller already runs


class RayPlacement(str, Enum):
    pack = "pack"  # replicas fill a node before the next (Ray's default bin-packing)
    spread = "spread"  # each replica goes to the alive node holding the fewest of ours


class Progress(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class RateLimitConfig:
    """Hosted APIs: the provider's per-minute limits, honoured with token buckets (unset: unlimited)."""

    rpm: Optional[float] = None  # requests per minute
    tpm: Optional[float] = None  # tokens per minute (prompt + completion)
    burst_s: float = 60.0  # seconds of allowance that may go at once


@dataclass
class EngineConfig:
    """One kind of engine; ``pool.engines`` of them are launched, or ``urls`` are attached."""

    # An HF model directory, a hub id, or the project's own tiny model (built on first use).
    model: str = EMBEDDED_MODEL
    # Interpreter that runs the vLLM server (vllm may live in another venv than the trainer).
    python: Optional[str] = None
    # Attach to engines that already run (OpenAI-compatible base URLs) instead of launching.
    urls: list[str] = field(default_factory=list)
    api_key: Optional[str] = None  # generated for launched engines when unset
    served_model_name: Optional[str] = None  # asked from /v1/models when unset
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    # Extra request fields passed through as they are, e.g. {service_tier: scale} for hosted APIs.
    extra_body: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"  # launched engines bind here; 0.0.0.0 on multi-node clusters
    port: int = 0  # 0: a free port per engine; otherwise engine i gets port + i
    dtype: str = "auto"  # vLLM --dtype (auto: the model's own)
    # Unset: 0.9 on GPUs the engine has to itself; with engine.colocate the planner's colocated fraction
    # (what the trainer's resident state leaves; tuning.colocated_utilization).
    gpu_memory_utilization: Optional[float] = None
    max_model_len: int = 2048  # prompt + completion tokens per sequence; sizes the per-engine cap preset
    max_num_seqs: Optional[int] = None  # default: the pool's per-engine cap
    max_num_batched_tokens: Optional[int] = None  # vLLM's prefill budget per step; >= max_model_len
    tensor_parallel_size: int = 1  # GPUs per engine
    # GPU placement of launched engines (pool.backend=local): each engine gets its own
    # tensor_parallel_size GPUs through CUDA_VISIBLE_DEVICES. Ids as nvidia-smi / CUDA_VISIBLE_DEVICES
    # name them. Unset: every visible GPU (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`); none: CPU engines.
    devices: list[str] = field(default_factory=list)
    # The trainer's GPUs (TRL: the training ranks'): never given to an engine unless engine.colocate.
    trainer_devices: list[str] = field(default_factory=list)
    # Share the trainer's GPUs (engines on engine.trainer_devices, or engine.devices); only when asked.
    colocate: bool = False
    enable_prefix_caching: bool = True  # a group's k samples share one prompt's KV
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` arguments, passed as they are
    env: dict[str, str] = field(default_factory=dict)  # extra environment of each launched engine
    # CPU engines: KV cache size and core binding (each engine gets its own cores).
    cpu_kvcache_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE (whole GiB)
    cpu_bind: CpuBind = CpuBind.auto  # auto: VLLM_CPU_OMP_THREADS_BIND splits the cores; off: vLLM's own
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: /pause, /resume, /collective_rpc …
    startup_timeout_s: float = 300.0  # a launched engine not healthy by then failed to start
    log_dir: str = "logs/engines"  # each launched engine's output: <log_dir>/engine<i>-port<port>.log


@dataclass
class TimeoutConfig:
    connect_s: float = 10.0  # opening a connection to an engine
    request_s: float = 1800.0  # one HTTP call (a pack may hold hundreds of long samples)
    # Unused since the client has no connection pool to wait in (the ledger is the only limit); kept so
    # configs that set it still load.
    admission_s: float = 60.0
    health_s: float = 5.0  # one /health or /metrics probe
    # An engine with samples in flight whose token counters (from /metrics) stay frozen this long is
    # hung (its API process may still answer /health): it leaves rotation and its work moves.
    stall_s: float = 60.0
    # No engine can serve the current weights and none can be refit (stale with no weight source, a refit
    # whose load failed): waiting callers get PoolError after this long, unless a source or engine comes.
    hopeless_s: float = 60.0


@dataclass
class RayConfig:
    """``pool.backend=ray``: where and how each engine's actor is placed (one placement group per replica)."""

    # Cluster to join: "auto", "host:port", "ray://…"; unset: the one this process is already connected to
    # (verl's driver), else a new local one.
    address: Optional[str] = None
    namespace: str = "rollout_plugin"  # Ray namespace of the engine actors
    placement: RayPlacement = RayPlacement.pack
    num_cpus: float = 1.0  # per replica (the vLLM server's own CPU work)
    # Per replica; unset: engine.tensor_parallel_size when the cluster has GPUs, else 0 (CPU engines).
    num_gpus: Optional[float] = None
    resources: dict[str, float] = field(default_factory=dict)  # custom resources every replica asks for
    # Node affinity: replica i also asks for one unit of nodes[i % len(nodes)], a custom resource its
    # node advertises (``ray start --resources='{"node_a": 1}'``); a replacement keeps its replica's.
    nodes: list[str] = field(default_factory=list)
    # Control calls only (start, lifetime, stop): the data path is HTTP straight to the engine.
    max_concurrency: int = 4
    replace_timeout_s: float = 300.0  # a dead replica's replacement waits this long for resources
    node_poll_s: float = 5.0  # how often new nodes are looked for (a given-up replica gets another try)
    # Elastic growth: when a node joins and no replica waits for a slot, add engines up to this many;
    # unset: the pool stays at pool.engines.
    max_engines: Optional[int] = None


@dataclass
class PrewarmConfig:
    """Short requests to every engine before it gets real traffic (CUDA graphs, caches, prefix cache)."""

    requests: int = 2  # per engine; 0: no warm-up
    max_tokens: int = 32  # long enough to cross a few KV blocks (new shapes compile on first use)
    timeout_s: float = 120.0  # per engine; a slower warm-up is logged and the engine goes into rotation anyway
    prefix: bool = True  # collect: also send the dataset's shared prompt prefix, so the prefix cache starts warm
    attached: bool = False  # also warm engines given by engine.urls (they may be warm already, or billed per call)


class WeightVerify(str, Enum):
    checksum = "checksum"  # set and read back each engine's version, and compare weight checksums across engines
    version = "version"  # set and read back each engine's version only
    off = "off"  # trust the load


class GroupMode(str, Enum):
    auto = "auto"  # n=k on one engine; split across engines when the load gap passes split_threshold
    together = "together"  # always one n=k request on one engine
    split = "split"  # k requests of one sample each (spread freely; packed with other prompts)


@dataclass
class GroupConfig:
    """How a GRPO group (one prompt, k samples) reaches the engines."""

    mode: GroupMode = GroupMode.auto
    # Split a group when the engine that would take it is filled (in-flight ÷ cap) above the
    # least-filled engine by more than this; below it the group waits for room on one engine.
    split_threshold: float = 0.25


@dataclass
class PoolConfig:
    engines: int = 1  # engines to launch; with engine.urls: one per URL
    k: int = 1  # samples per prompt (GRPO group size)
    # Xtuner's rollout_max_batch_size_per_instance; unset: 1024/512/128/64 by max_model_len.
    per_engine: Optional[int] = None
    over_concurrency_ratio: float = 1.2  # cap × this in flight per engine, so its queue never runs dry
    # Global in-flight cap in groups; unset: per_engine × engines / k × ratio, raised with the engines' caps
    # as the controller raises them (set, it is fixed).
    max_concurrent: Optional[int] = None
    # Samples per HTTP call: groups go as n=k, independent prompts pack into one multi-prompt call.
    pack_size: int = 64
    groups: GroupConfig = field(default_factory=GroupConfig)
    # distllm's batch_timeout: when requests trickle in one by one (a gateway, an agent loop), hold a
    # small pack up to this long for more to join; 0 sends at once (a trainer's batch fills packs anyway).
    pack_timeout_s: float = 0.0
    # Homes of affinity keys (Request.affinity: a group sent sample by sample, a session's turns; the engine
    # holding its prefix) remembered at most, least recently placed dropped first (~200 bytes each + the key).
    affinity_max_keys: int = 100_000
    # A home unused this long is forgotten (trainers that never end a session: verl 0.9.1); null: never.
    # RolloutPool.end_session(key) frees one at once.
    affinity_ttl_s: Optional[float] = 3600.0
    stream: bool = False  # SSE per call (lower throughput, per-token progress)
    # Calls asking at least this many tokens stream even without pool.stream: the pool then sees their
    # tokens as they come, and a sample whose engine dies or hangs mid-call continues elsewhere from
    # them instead of starting over. Unset: only pool.stream streams.
    stream_min_tokens: Optional[int] = None
    max_retries: int = 3  # per request, each on another engine while one is left
    # Retries go to another healthy engine at once; when none is left, they back off exponentially
    # with full jitter (connection errors, 5xx, 429 without Retry-After).
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0  # the longest wait between retries
    metrics_port: Optional[int] = None  # serve rollout_pool_* Prometheus metrics on 127.0.0.1:<port>
    max_restarts: int = 2  # per launched engine that dies; 0: a dead engine stays out
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    prewarm: PrewarmConfig = field(default_factory=PrewarmConfig)
    backend: PoolBackend = PoolBackend.local  # where launched engines run (engine.urls attaches instead)
    # After each weight update: how sure to be that every engine holds the new weights (vLLM dev mode's
    # /update_weight_version, /weight_info, /weight_checker; engines without them are trusted).
    verify_weights: WeightVerify = WeightVerify.checksum
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SamplingConfig:
    max_tokens: int = 128  # completion tokens per sample at most
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass; 1: off
    top_k: int = -1  # -1: off
    min_tokens: int = 0  # completion tokens before EOS or a stop string may end a sample
    seed: Optional[int] = None  # per-request sampling seed; unset: random
    stop: list[str] = field(default_factory=list)  # strings that end a sample
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    logprobs: bool = False  # return each sampled token's logprob


@dataclass
class VerifyConfig:
    """``verify=inline`` (default) or ``verify=deferred``; ``verify.executor=process`` for CPU-bound verifiers."""

    # "module:function" or "module.function"; called as fn(completion, example) -> float
    # (or fn(completion, example, mode=...) when it implements fast/exact).
    verifier: str = "rollout_plugin.verify.builtin:last_number_match"
    executor: ExecutorKind = ExecutorKind.thread
    workers: int = 4  # verifications at once
    timing: VerifyTiming = VerifyTiming.inline
    mode: VerifyMode = VerifyMode.exact  # passed to verifiers that take a `mode` argument
    cache_size: int = 100_000  # (verifier, prompt, completion) results kept; 0: no cache


class ControllerMode(str, Enum):
    adaptive = "adaptive"
    off = "off"


@dataclass
class PackControlConfig:
    """``controller.pack``: choose the pack size (samples per call, up to ``pool.pack_size``) by measured tokens/s."""

    mode: ControllerMode = ControllerMode.adaptive  # off: always pool.pack_size
    window_s: float = 5.0  # one measurement per window in which work waited in the pool
    min_gain: float = 0.05  # leave a size only for ≥5 % more tokens/s
    decay: float = 0.5  # weight of the newest window in a size's score
    reprobe_every: int = 6  # windows at a settled size before its neighbours are measured again


@dataclass
class ControllerConfig:
    """``controller=adaptive`` (default) or ``controller=off`` (fixed caps from the Xtuner presets)."""

    mode: ControllerMode = ControllerMode.adaptive  # adaptive: caps follow each engine's /metrics; off: fixed
    interval_s: float = 1.0  # how often each engine is observed while the controller has something to decide
    # With nothing to decide (no work waiting, no engine at its cap, under KV pressure or slow, no trial open) the
    # period doubles up to this: each look is a /metrics call on the engine's API server, and on CPU engines
    # that share cores with it a 1 Hz look cost ~10 % of a busy pair's makespan. Work that queues ends the wait.
    quiet_interval_s: float = 8.0
    min_cap: int = 1  # samples; raised to the group size k
    max_cap: Optional[int] = None  # samples; unset: 2 × the initial cap
    kv_high: float = 0.95  # cut above this KV-cache usage
    raise_factor: float = 1.25  # cap × this on a raise
    cut_factor: float = 0.7  # cap × this on a cut (preemptions, KV above kv_high)
    min_gain: float = 0.03  # a raise must buy ≥3 % more tokens/s, or the cap stops rising
    at_cap_fraction: float = 0.9  # the engine counts as cap-bound above this share of its cap
    # Caps are judged by the tokens/s they buy (pool/policy/caps.py). A protective cut (preemptions, KV above
    # kv_high) is on trial for trial_s once it bites: if tokens/s fell by more than cut_tolerance it is undone
    # and preemption counts as cheap on that engine (no cut on it alone) for cheap_s, doubled each time it is
    # found again. A raise is judged on trial_s too, and undone only if it cost more than raise_tolerance:
    # both lean upward, as short windows are noisy and an engine held below what it runs is the error to avoid.
    trial_s: float = 3.0
    cut_tolerance: float = 0.05
    raise_tolerance: float = 0.1
    cheap_s: float = 300.0
    probe_factor: float = 2.0  # raise factor from the start until the first raise that doesn't pay (slow start)
    reprobe_s: float = 30.0  # a cap whose last raise bought nothing is raised again after this long
    expected_tokens: Optional[int] = None  # per sample, for the KV-based first estimate; unset: max_model_len
    # A /metrics answer that came later than this share of the window since the last one is no measurement:
    # the controller decides nothing on it (a late scrape once read "22 tok/s at 308" and cut on it).
    max_scrape_lag: float = 0.25
    # Straggler-aware placement (pool/policy/straggler.py): routing weighs each engine's decode speed against the
    # fleet's; with nothing left to dispatch, the work on engines slower than slow_below × the fleet moves to
    # the others (from its tokens when streamed, else from the start).
    straggler_moves: bool = True
    slow_below: float = 0.75  # catches 1.5× stragglers (speed 0.67); a 0.9× engine is not worth a move
    # Spreading a step's tail (pool/policy/spread.py): with nothing left to dispatch, each idle engine takes one
    # call off the engine decoding the most sequences, continued from its tokens (vLLM's /abort_requests).
    tail_spread: bool = True
    timeline: Optional[str] = None  # JSONL timeline path (`rollout-plugin plot` draws it)
    pack: PackControlConfig = field(default_factory=PackControlConfig)


@dataclass
class CollectConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    input: Optional[str] = None  # JSONL of prompts; unset: the arithmetic set shipped in the package
    output: str = "rollouts.jsonl"  # one line per sample; .summary.json, .timeline.jsonl, .errors.jsonl beside it
    overwrite: bool = False  # replace an existing output (else refused)
    resume: bool = False  # keep an existing output's whole lines; generate only the prompts not done
    limit: Optional[int] = None  # use only the first N prompts
    progress: Progress = Progress.auto  # a progress bar on stderr; auto: when stderr is a terminal
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="collect_schema", node=CollectConfig)
    cs.store(group="engine", name="schema", node=EngineConfig)
    cs.store(group="pool", name="schema", node=PoolConfig)
    cs.store(group="sampling", name="schema", node=SamplingConfig)
    cs.store(group="controller", name="schema", node=ControllerConfig)
