"""``rollout-plugin doctor run=rollouts.jsonl [urls=[http://…]]``: say what to change (hydra_conf/doctor.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rollout_plugin.cli import aio
from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp


@dataclass
class DoctorConfig:
    run: Optional[str] = None  # a collect output: reads <run>.summary.json and <run>.timeline.jsonl
    summary: Optional[str] = None  # or name the files one by one
    timeline: Optional[str] = None  # with summary: the run's timeline JSONL (fewer checks without one)
    urls: list[str] = field(default_factory=list)  # live engines: read their /metrics now
    api_key: Optional[str] = None  # live: sent as Authorization: Bearer to the engines
    interval_s: float = 2.0  # live: the window over which preemptions are counted
    log_level: str = "WARNING"  # DEBUG, INFO, WARNING or ERROR


def register_doctor_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="doctor_schema", node=DoctorConfig)


HELP = CommandHelp(
    about="Reads a run's summary and timeline (and, given engine URLs, their live /metrics) and says what to "
          "change: each finding names the problem, the numbers that show it and the override to try "
          "(underfed caps, batches not filling, KV pressure or idle KV, verification-bound runs, stragglers).",
    examples=("rollout-plugin doctor run=rollouts.jsonl",
              "rollout-plugin doctor urls=[http://gpu1:8000,http://gpu2:8000] interval_s=5"),
    config="doctor", schema=DoctorConfig, register=register_doctor_configs)


def report(cfg: DoctorConfig) -> list[str]:
    from rollout_plugin.doctor.findings import diagnose, live_facts, run_facts
    from rollout_plugin.doctor.inputs import load_summary, load_timeline, run_files, scrape

    lines: list[str] = []
    if cfg.run or cfg.summary or not cfg.urls:
        s, t = run_files(cfg.run, cfg.summary, cfg.timeline)
        findings = diagnose(run_facts(load_summary(s), load_timeline(t)))
        lines.append(f"doctor: {s}" + (f" + {t}" if t else " (no timeline: fewer checks)"))
        lines += [line for f in findings for line in f.lines()] or ["  nothing to change: no rule fired"]
    if cfg.urls:
        findings = diagnose(live_facts(aio.run(scrape(list(cfg.urls), cfg.api_key, cfg.interval_s))))
        lines.append(f"doctor: live /metrics of {len(cfg.urls)} engine(s)")
        lines += [line for f in findings for line in f.lines()] or ["  nothing to change right now"]
    return lines


def run(overrides: list[str]) -> int:
    register_doctor_configs()
    cfg = compose("doctor", overrides, DoctorConfig)
    configure_logging(cfg.log_level)
    print("\n".join(report(cfg)))
    return 0
