"""``rollout-plugin verl-check <verl overrides>``: the whole config checked before any GPU is touched.

Composes verl's own ``ppo_trainer`` config with the user's overrides plus our group (``+rollout_pool=pool``
unless they chose one), then runs, collecting every problem instead of stopping at the first:

1. Hydra composition (unknown keys, missing ``+``);
2. our planner on the job's shape (indivisible batches, a model that does not fit, bad presets);
3. resolving every value (our resolvers, verl's interpolations);
4. our cross-checks of the final values (what verl skips under dynamic batching, engine limits,
   router settings);
5. verl's own ``validate_config`` and its actor/rollout/critic dataclass checks;
6. a warning when a request may wait in our router's admission queue for half of
   ``admission_timeout_s`` or more (the planner's throughput model, every response at full length):
   verl 0.9.1's client does not retry a refused acquire, so a timeout fails the step.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from rollout_plugin.adapters.verl.admission import server_cap
from rollout_plugin.adapters.verl.resolvers import ACTOR, NAMESPACE, ROLLOUT, plan_for
from rollout_plugin.adapters.verl.router import parse_settings
from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.tuning.planner import Plan
from rollout_plugin.tuning.throughput import RolloutEstimate, rollout_estimate

DEFAULT_GROUP = f"+{NAMESPACE}=pool"
# Warn when the longest expected admission wait reaches this share of the router's admission_timeout_s.
WAIT_WARN_FRACTION = 0.5
# Shown after a successful check: what the job will run with.
SUMMARY_KEYS = (
    "data.train_batch_size", f"{ROLLOUT}.n", f"{ACTOR}.ppo_mini_batch_size", f"{ACTOR}.ppo_micro_batch_size_per_gpu",
    f"{ACTOR}.use_dynamic_bsz", f"{ACTOR}.ppo_max_token_len_per_gpu", f"{ACTOR}.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu",
    f"{ROLLOUT}.tensor_model_parallel_size", f"{ROLLOUT}.gpu_memory_utilization", f"{ROLLOUT}.max_model_len",
    f"{ROLLOUT}.max_num_batched_tokens", f"{ROLLOUT}.max_num_seqs", f"{ROLLOUT}.router_config_path",
)


@dataclass
class CheckReport:
    overrides: list[str]
    problems: list[ConfigProblem] = field(default_factory=list)
    config: Any = None  # the composed, resolved DictConfig (None if composition failed)
    plan: Optional[Plan] = None
    warnings: list[str] = field(default_factory=list)  # what may go wrong at run time; not refused
    rollout: Optional[RolloutEstimate] = None  # the throughput model's step, where it applies

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, key: str, value: object, reason: str, suggestion: object = None) -> None:
        self.problems.append(ConfigProblem(key, value, reason, None if suggestion is None else f"{key}={suggestion}"))


def with_our_group(overrides: list[str]) -> list[str]:
    """The user's overrides, plus ``+rollout_pool=pool`` if they named no rollout_pool group."""
    if any(re.match(rf"^\+?{NAMESPACE}=", o) for o in overrides):
        return list(overrides)
    return [DEFAULT_GROUP, *overrides]


def compose_verl(overrides: list[str], config_name: str = "ppo_trainer") -> Any:
    """verl's own trainer config with these overrides (our groups found through our search-path plugin)."""
    import verl  # loads our verl.plugins entry point: resolvers + search path
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def check(overrides: list[str]) -> CheckReport:
    """Every problem with this verl command line, found without a GPU."""
    report = CheckReport(with_our_group(overrides))
    try:
        cfg = compose_verl(report.overrides)
    except Exception as exc:  # Hydra's own errors name the override; nothing else can be checked
        report.add("overrides", " ".join(overrides), _one_line(exc))
        return report
    report.config = cfg
    try:
        report.plan = plan_for(cfg)
    except ConfigError as exc:
        report.problems += exc.problems
    except Exception as exc:
        report.add(NAMESPACE, None, f"the planner could not read this config: {_one_line(exc)}")
    if report.problems:
        return report  # every tuned value would fail the same way
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        cause = _config_error(exc)
        if cause is not None:
            report.problems += cause.problems
        else:
            report.add("config", None, _one_line(exc))
        return report
    _our_checks(cfg, report)
    _verl_checks(cfg, report)
    if report.ok:
        _queue_wait(cfg, report)
    return report


def _our_checks(cfg: Any, report: CheckReport) -> None:
    """What verl lets through (or checks only at run time, on a GPU) but a run would trip over."""
    r, a = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    n, world = int(r.n), int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    sp = int(a.ulysses_sequence_parallel_size or 1)
    max_len = int(r.max_model_len or (int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length)))
    if int(r.max_num_batched_tokens) < max_len:
        report.add(f"{ROLLOUT}.max_num_batched_tokens", r.max_num_batched_tokens,
                   f"below max_model_len ({max_len}): a long prompt cannot prefill in one step", max(max_len, 8192))
    if r.max_num_seqs is not None and int(r.max_num_seqs) < n:
        report.add(f"{ROLLOUT}.max_num_seqs", r.max_num_seqs, f"a GRPO group of n={n} must fit one engine's batch", n)
    if r.max_model_len is not None and int(r.max_model_len) < int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length):
        report.add(f"{ROLLOUT}.max_model_len", r.max_model_len,
                   f"shorter than data.max_prompt_length + data.max_response_length "
                   f"({int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length)})",
                   int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length))
    # verl checks micro-batches only with use_dynamic_bsz=false; a later switch should not be a surprise.
    dp = max(1, world // sp)
    mini = int(a.ppo_mini_batch_size) * n
    if mini % dp == 0 and a.ppo_micro_batch_size_per_gpu is not None:
        per_gpu, micro = mini // dp, int(a.ppo_micro_batch_size_per_gpu)
        if per_gpu % micro:
            fits = [d for d in range(1, per_gpu + 1) if per_gpu % d == 0 and d <= micro] or [1]
            report.add(f"{ACTOR}.ppo_micro_batch_size_per_gpu", micro,
                       f"must divide the per-GPU mini-batch (ppo_mini_batch_size × n ÷ (GPUs ÷ sp) = {per_gpu})",
                       max(fits))
    if r.get("router_config_path"):
        settings = OmegaConf.to_container(r.custom.get(NAMESPACE), resolve=True) if r.get("custom") else None
        try:
            parse_settings(settings)
        except ConfigError as exc:
            report.problems += [ConfigProblem(f"{NAMESPACE}.{p.key}", p.value, p.reason, p.suggestion and
                                              f"{NAMESPACE}.{p.suggestion}") for p in exc.problems]
        if not Path(str(r.router_config_path)).is_file():
            report.add(f"{ROLLOUT}.router_config_path", r.router_config_path, "no such file")
    util = float(r.gpu_memory_utilization)
    if not 0 < util <= 1:
        report.add(f"{ROLLOUT}.gpu_memory_utilization", util, "must be in (0, 1]", 0.6)
    if cfg.algorithm.adv_estimator == "grpo" and n < 2:
        report.add(f"{ROLLOUT}.n", n, "GRPO's advantage compares samples of one prompt: it needs n ≥ 2", 8)


def _queue_wait(cfg: Any, report: CheckReport) -> None:
    """Our router's admission queue: samples beyond what the servers hold wait; a wait past the timeout fails."""
    r, plan = cfg.actor_rollout_ref.rollout, report.plan
    if plan is None or not r.get("router_config_path"):
        return  # verl's own router queues nothing (and has no timeout)
    try:
        settings = parse_settings(OmegaConf.to_container(r.custom.get(NAMESPACE), resolve=True)
                                  if r.get("custom") else None)
    except ConfigError:
        return  # already reported
    tp = int(r.tensor_model_parallel_size)
    engines, n = max(1, plan.rollout_gpus // tp), int(r.n)
    running = int(r.max_num_seqs or plan.engine.max_num_seqs)
    cap = server_cap(max_num_seqs=running, max_model_len=int(r.max_model_len), group_size=settings.group_size or n,
                     servers=engines, ratio=settings.over_concurrency_ratio, per_engine=settings.per_engine)
    est = rollout_estimate(plan.model, plan.hardware, engines=engines, tp=tp, running=min(running, cap),
                           samples=int(cfg.data.train_batch_size) * n, admitted=engines * cap,
                           prompt_tokens=int(cfg.data.max_prompt_length),
                           response_tokens=int(cfg.data.max_response_length))
    report.rollout = est
    timeout = settings.admission_timeout_s
    if est is None or est.wait_s < WAIT_WARN_FRACTION * timeout:
        return
    need = int(est.wait_s * 1.5 // 60 + 1) * 60  # the estimate plus half again, in whole minutes
    report.warnings.append(
        f"{NAMESPACE}.router.admission_timeout_s={timeout:g}: a request may wait ~{_secs(est.wait_s)} "
        f"({est.wait_s / timeout:.0%} of it) for a free server if responses run to data.max_response_length="
        f"{est.response_tokens} ({est.samples} samples per step, {est.engines} servers × {cap} admitted, "
        f"~{est.samples_per_s:.1f} samples/s by the planner's throughput model for {plan.model.name} on "
        f"{plan.hardware.name}); past the timeout the acquire fails and verl fails the step: set "
        f"{NAMESPACE}.router.admission_timeout_s={need}, or fewer samples per step (data.train_batch_size)")


def _verl_checks(cfg: Any, report: CheckReport) -> None:
    """verl's own validation, each part run on its own so one failure does not hide the next."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    use_ref, use_critic = need_reference_policy(cfg), need_critic(cfg)
    steps = [("validate_config", lambda c: validate_config(c, use_reference_policy=use_ref, use_critic=use_critic)),
             (f"RolloutConfig({ROLLOUT})", lambda c: omega_conf_to_dataclass(c.actor_rollout_ref.rollout))]
    if cfg.actor_rollout_ref.actor.use_dynamic_bsz:
        # verl skips its batch checks under dynamic batching; run them on the fixed micro-batches too.
        fixed = copy.deepcopy(cfg)
        fixed.actor_rollout_ref.actor.use_dynamic_bsz = False
        if use_critic:
            fixed.critic.use_dynamic_bsz = False
        steps.append(("validate_config with use_dynamic_bsz=false",
                      lambda c: validate_config(fixed, use_reference_policy=use_ref, use_critic=use_critic)))
    for name, run in steps:
        try:
            run(cfg)
        except Exception as exc:
            report.add("verl", name, _one_line(exc))


def _config_error(exc: BaseException) -> Optional[ConfigError]:
    """Our ConfigError inside OmegaConf's resolution error, if that is what failed."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def summary(report: CheckReport) -> str:
    """The values the job will run with, and the plan's notes."""
    lines = []
    for key in SUMMARY_KEYS:
        lines.append(f"  {key} = {OmegaConf.select(report.config, key)}")
    if report.plan is not None:
        lines += [f"  note: {note}" for note in report.plan.notes]
    if report.rollout is not None:
        e = report.rollout
        lines.append(f"  rollout estimate: {e.samples} samples on {e.engines} servers × {e.running} running, "
                     f"~{_secs(e.rollout_s)} per step at full-length responses ({e.samples_per_s:.1f} samples/s); "
                     f"longest admission wait ~{_secs(e.wait_s)}")
    lines += [f"  warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _secs(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.1f} s"

