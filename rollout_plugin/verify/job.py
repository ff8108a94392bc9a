"""Deferred verification: ``rollout-plugin verify input=unverified.jsonl output=verified.jsonl parallelism=50``.

Reads rollouts that ``collect verify=deferred`` wrote (one sample a line, each with its ``example``
and ``prompt``), scores them with up to ``parallelism`` verifications at once and appends each
scored row as soon as it is done, flushed. Killed at any point, ``resume=true`` keeps every whole
line already written, drops a torn last one, and scores only the ids not yet in the output: no
sample lost, none doubled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from rollout_plugin.collect.dataset import jsonl_rows
from rollout_plugin.config.schema import Progress, VerifyConfig
from rollout_plugin.config.validate import Problems
from rollout_plugin.errors import InputError
from rollout_plugin.verify.cache import VerifyCache
from rollout_plugin.verify.runner import VerifierRunner, load_verifier

log = logging.getLogger(__name__)


@dataclass
class VerifyJobConfig:
    input: Optional[str] = None  # JSONL written by `rollout-plugin collect verify=deferred`
    output: Optional[str] = None  # unset: <input>.verified.jsonl
    parallelism: int = 16  # verifications at once (the executor's workers)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    overwrite: bool = False  # replace an existing output (else refused)
    resume: bool = False  # keep the output's whole lines, drop a torn last one, score only the ids not written
    progress: Progress = Progress.auto  # a progress bar on stderr; auto: when stderr is a terminal
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR


@dataclass
class VerifyJobSummary:
    input: str
    output: str
    rows: int
    skipped_done: int
    verified: int
    errors: int
    cache_hits: int
    reward_mean: Optional[float]
    wall_s: float
    rows_per_s: float
    busy_fraction: float  # share of the run with a verification running: < 1 means input/output bound

    def lines(self) -> list[str]:
        reward = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        return [
            f"verify: {self.verified} of {self.rows} rows scored in {self.wall_s:.1f}s "
            f"({self.skipped_done} already done, {self.errors} verifier errors, {self.cache_hits} cache hits)",
            f"  rows/s {self.rows_per_s:.1f} | reward mean {reward} | verifier busy {self.busy_fraction:.0%}",
            f"  output: {self.output}",
        ]


def default_output(input_path: Path) -> Path:
    return input_path.with_name(input_path.stem + ".verified.jsonl")


def validate_verify_job(cfg: VerifyJobConfig) -> tuple[Path, Path]:
    p = Problems()
    if not cfg.input:
        p.add("input", cfg.input, "required: the JSONL that `collect verify=deferred` wrote", "rollouts.jsonl")
    p.at_least("parallelism", cfg.parallelism, 1)
    p.at_least("verify.cache_size", cfg.verify.cache_size, 0)
    if cfg.overwrite and cfg.resume:
        p.add("resume", cfg.resume, "cannot be combined with overwrite=true", False)
    p.raise_if_any()
    src = Path(cfg.input).expanduser()  # type: ignore[arg-type]
    dst = Path(cfg.output).expanduser() if cfg.output else default_output(src)
    if not src.is_file():
        raise InputError(f"input={cfg.input!r}: no such file")
    if dst.resolve() == src.resolve():
        raise InputError(f"output={str(dst)!r}: must differ from input (rows are appended as they are scored)")
    if dst.exists() and not (cfg.overwrite or cfg.resume):
        raise InputError(f"output={str(dst)!r} exists; pass resume=true to continue it or overwrite=true to replace it")
    if not dst.parent.is_dir():
        raise InputError(f"output={str(dst)!r}: directory {str(dst.parent)!r} does not exist")
    return src, dst


def scan_input(path: Path) -> int:
    """Check every line before scoring starts; returns the row count."""
    seen: dict[str, int] = {}
    for lineno, where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or "id" not in row:
            raise InputError(f"{where}: a rollout row needs 'id' and 'completion' "
                             f"(write it with `rollout-plugin collect verify=deferred`)")
        rid = str(row["id"])
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
    if not seen:
        raise InputError(f"input={str(path)!r}: no rows")
    return len(seen)


def read_done(path: Path) -> tuple[set[str], list[str]]:
    """Ids already scored in ``path`` and its whole lines (a torn or garbled tail is dropped)."""
    done: set[str] = set()
    kept: list[str] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if not raw.endswith("\n"):
                break
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            if str(row.get("id")) in done:
                continue  # never doubled, even if a foreign tool appended one twice
            done.add(str(row.get("id")))
            kept.append(raw)
    return done, kept


def _open_output(dst: Path, resume: bool) -> tuple[IO[str], set[str]]:
    if resume and dst.exists():
        done, kept = read_done(dst)
        tmp = dst.with_name(dst.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, dst)  # atomically without the torn tail
        return open(dst, "a", encoding="utf-8"), done
    return open(dst, "w", encoding="utf-8"), set()


def _progress(cfg: VerifyJobConfig, total: int):
    from tqdm import tqdm

    disable = cfg.progress == Progress.off or (cfg.progress == Progress.auto and not sys.stderr.isatty())
    return tqdm(total=total, unit="row", disable=disable, dynamic_ncols=True, file=sys.stderr)


async def verify_file(cfg: VerifyJobConfig) -> VerifyJobSummary:
    """Score a deferred rollout file; raises :class:`RolloutPluginError` subclasses for bad input first."""
    src, dst = validate_verify_job(cfg)
    total = scan_input(src)
    verifier = load_verifier(cfg.verify.verifier)
    out, done = _open_output(dst, cfg.resume)
    wall0 = time.monotonic()
    rewards: list[float] = []
    errors = 0
    runner = VerifierRunner(verifier, cfg.verify.executor, cfg.parallelism, mode=cfg.verify.mode,
                            cache=VerifyCache(cfg.verify.cache_size))
    bar = _progress(cfg, total - len(done))
    slots = asyncio.Semaphore(cfg.parallelism)  # bounds rows read ahead of the verifier

    async def one(row: dict[str, Any]) -> None:
        nonlocal errors
        try:
            example = row.get("example") or {}
            reward, error = await runner.score(row["completion"], example, row.get("prompt"))
            scored = {**row, "reward": reward, "verified": True}
            scored.pop("verify_error", None)
            if error:
                scored["verify_error"] = error
                errors += 1
            else:
                rewards.append(reward)  # type: ignore[arg-type]
            out.write(json.dumps(scored, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)
        finally:
            slots.release()

    try:
        async with runner, asyncio.TaskGroup() as tg:
            with open(src, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if str(row["id"]) in done:
                        continue
                    await slots.acquire()
                    tg.create_task(one(row))
    finally:
        bar.close()
        out.close()
    wall = time.monotonic() - wall0
    verified = len(rewards) + errors
    return VerifyJobSummary(
        input=str(src), output=str(dst), rows=total, skipped_done=len(done), verified=verified, errors=errors,
        cache_hits=runner.stats.cache_hits,
        reward_mean=round(sum(rewards) / len(rewards), 4) if rewards else None, wall_s=round(wall, 2),
        rows_per_s=round(verified / max(wall, 1e-9), 1),
        busy_fraction=round(min(1.0, runner.stats.busy_s / max(wall, 1e-9)), 3))
