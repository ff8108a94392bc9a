"""``rollout-plugin verl-check <the overrides you give verl>``: every config problem, before any GPU is touched.

    rollout-plugin verl-check +rollout_pool=pool actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct \\
        data.train_batch_size=256 actor_rollout_ref.rollout.n=8 trainer.n_gpus_per_node=8

Needs verl installed (``pip install rollout-plugin[verl]``). Prints each problem on its own line
(key, value, why, what would be valid) and exits 1, or the values the job will run with and exits 0.
"""

from __future__ import annotations

import sys

from rollout_plugin.errors import InputError


def run(overrides: list[str]) -> int:
    try:
        import verl  # noqa: F401  (loads our verl.plugins entry point)
    except ImportError as exc:
        raise InputError(f"verl is not importable here ({exc}); pip install 'rollout-plugin[verl]'") from None
    from rollout_plugin.adapters.verl.check import check, summary

    report = check(overrides)
    command = "python -m verl.trainer.main_ppo " + " ".join(report.overrides)
    if not report.ok:
        print(f"verl-check: {len(report.problems)} problem(s) in: {command}", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"verl-check: ok: {command}")
    print(summary(report))
    return 0
