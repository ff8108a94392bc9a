"""Fit a profile's step-time model to measured points and say how far off it is.

Measured points (``benchmarks/sim_calibrate.py``): ``concurrency`` single-sample requests sent at
once, forced to ``prompt_tokens`` in and ``output_tokens`` out, with their makespan. With every
request arriving at t=0 the engine model's schedule does not depend on the step-time
coefficients, only on slots, KV and prefill budget, so the predicted makespan is linear in them:
run the engine model once per unit coefficient to get each point's features, then least squares
on relative error (non-negative coefficients). Points flagged ``holdout`` stay out of the fit;
their error is the calibration error the simulator reports.

Published points (GPU profiles, no engine here to measure): ``tpot_s`` or ``output_tok_s`` at a
concurrency and mean context; the model's decode step is compared directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.sim.profile import EngineProfile, StepModel, profile_from_dict

UNITS = [StepModel(1, 0, 0, 0, 0), StepModel(0, 1, 0, 0, 0), StepModel(0, 0, 1, 0, 0), StepModel(0, 0, 0, 1, 0),
         StepModel(0, 0, 0, 0, 1)]
COEFFS = ("base_s", "per_seq_s", "per_ctx_token_s", "per_prefill_token_s", "per_admit_s")


def predict_makespan(profile: EngineProfile, concurrency: int, prompt_tokens: int, output_tokens: int) -> float:
    """Simulated makespan of ``concurrency`` requests arriving together at one engine."""

    async def main() -> float:
        engine = SimEngine("calib", profile)
        calls = [engine.submit([prompt_tokens], [[output_tokens]]) for _ in range(concurrency)]
        await asyncio.gather(*(c.future for c in calls))
        return asyncio.get_running_loop().time()

    return run_virtual(main())


def features(profile: EngineProfile, point: dict[str, Any]) -> list[float]:
    return [predict_makespan(replace(profile, step=u), point["concurrency"], point["prompt_tokens"],
                             point["output_tokens"]) for u in UNITS]


def _lstsq(rows: list[list[float]], ys: list[float], cols: list[int]) -> list[float] | None:
    """Least squares on a subset of columns (normal equations; 5 unknowns at most)."""
    a = [[sum(r[i] * r[j] for r in rows) for j in cols] for i in cols]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in cols]
    n = len(cols)
    for c in range(n):  # Gauss-Jordan with partial pivoting
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[p][c]) < 1e-300:
            return None
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
                b[r] -= f * b[c]
    return [b[i] / a[i][i] for i in range(n)]


def fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares on relative error, by trying every support (2⁵ subsets)."""
    rel_rows = [[x / y for x in r] for r, y in zip(rows, ys)]
    ones = [1.0] * len(ys)
    width = len(rows[0])
    best, best_err = [0.0] * width, math.inf
    for k in range(1, width + 1):
        for cols in itertools.combinations(range(width), k):
            sol = _lstsq(rel_rows, ones, list(cols))
            if sol is None or min(sol) < 0:
                continue
            coef = [0.0] * width
            for c, v in zip(cols, sol):
                coef[c] = v
            err = sum((sum(c * x for c, x in zip(coef, r)) - 1) ** 2 for r in rel_rows)
            if err < best_err:
                best, best_err = coef, err
    return best


def _errors(pairs: list[tuple[float, float]]) -> dict[str, float]:
    rel = [abs(p - m) / m for p, m in pairs]
    return {"points": len(rel), "median_abs_pct": round(100 * statistics.median(rel), 1),
            "max_abs_pct": round(100 * max(rel), 1)} if rel else {"points": 0}


def refit(data: dict[str, Any]) -> dict[str, Any]:
    """Fit ``data['points']`` (measured makespans) and store coefficients + errors; returns ``data``."""
    data.setdefault("step", dict.fromkeys(COEFFS, 0.0))
    profile = profile_from_dict(data)
    pts = data["points"]
    feats = [features(profile, p) for p in pts]
    train = [i for i, p in enumerate(pts) if not p.get("holdout")]
    coef = fit([feats[i] for i in train], [pts[i]["makespan_s"] for i in train])
    data["step"] = {name: float(f"{v:.4g}") for name, v in zip(COEFFS, coef)}
    for p, f in zip(pts, feats):
        p["predicted_s"] = round(sum(c * x for c, x in zip(coef, f)), 3)
    data["calibration"] = {
        "method": "non-negative least squares on relative makespan error; holdout points not fitted",
        "fit": _errors([(p["predicted_s"], p["makespan_s"]) for p in pts if not p.get("holdout")]),
        "holdout": _errors([(p["predicted_s"], p["makespan_s"]) for p in pts if p.get("holdout")]),
    }
    return data


def published_errors(data: dict[str, Any]) -> dict[str, Any]:
    """Compare a profile's decode step with published TPOT / throughput points."""
    profile = profile_from_dict(data)
    pairs = []
    for p in data.get("published", []):
        b, ctx = p["concurrency"], p["context_tokens"]
        step = profile.step.seconds(b, b * ctx, 0.0)
        pred = step if "tpot_s" in p else b / step
        meas = p.get("tpot_s", p.get("output_tok_s"))
        p["predicted"] = round(pred, 5)
        pairs.append((pred, meas))
    return _errors(pairs)


def refit_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = json.loads(path.read_text())
    if "points" in data:
        refit(data)
    if "published" in data:
        data["calibration"] = {**data.get("calibration", {}), "published": published_errors(data)}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return {"step": data["step"], "calibration": data["calibration"]}
