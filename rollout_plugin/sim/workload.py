"""GRPO-shaped workloads: every length decided up front, so every policy generates the same tokens.

Single-turn: one request per prompt with ``n = k`` (a GRPO group). Multi-turn: each of the ``k``
samples is its own session of ``turns`` requests with ``n = 1``; turn ``t``'s prompt is the first
prompt plus every earlier answer and tool output (what an agent loop resends).

Every request says what its prompt's tokens are (``CONTENT_KEY``: segments for the engines' prefix cache): a
group's first prompt, each turn's answer and tool output, so a turn's prompt extends its session's last one and
a group's ``k`` sessions share their first prompt. With ``workload.affinity`` a session's turns carry the
affinity keys verl's router gives them (``adapters/verl/router.py`` ``_affinity``): the first turn its group's
prompt, then the session's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout_plugin.sim.client import CONTENT_KEY, OUTPUT_KEY, PROMPT_KEY
from rollout_plugin.sim.config import WorkloadConfig
from rollout_plugin.sim.prefix_cache import output_segment
from rollout_plugin.types import Request, SamplingParams


@dataclass(frozen=True)
class Session:
    """Requests run one after another (a tool call between turns); single-turn sessions have one."""

    group: int
    turns: tuple[Request, ...]


def _lognormal(rng: random.Random, median: float, sigma: float, hi: int) -> int:
    return int(min(hi, max(1, round(median * rng.lognormvariate(0.0, sigma)))))


def build_sessions(cfg: WorkloadConfig, prompts: int) -> list[Session]:
    rng = random.Random(cfg.seed)
    sampling = SamplingParams(max_tokens=cfg.max_tokens)  # one set for all: requests pack together
    sessions: list[Session] = []
    for g in range(prompts):
        prompt = _lognormal(rng, cfg.prompt_tokens_median, cfg.prompt_tokens_sigma, cfg.max_tokens)
        if cfg.turns <= 1:
            outs = tuple(_lognormal(rng, cfg.output_tokens_median, cfg.output_tokens_sigma, cfg.max_tokens)
                         for _ in range(cfg.k))
            req = Request(f"g{g}", f"p{g}", n=cfg.k, sampling=sampling,
                          metadata={PROMPT_KEY: prompt, OUTPUT_KEY: outs, CONTENT_KEY: ((("prompt", g), prompt),)})
            sessions.append(Session(g, (req,)))
            continue
        for s in range(cfg.k):
            ctx, turns, content = prompt, [], ((("prompt", g), prompt),)
            for t in range(cfg.turns):
                out = _lognormal(rng, cfg.output_tokens_median, cfg.output_tokens_sigma, cfg.max_tokens)
                text, rid = f"p{g}s{s}t{t}", f"g{g}s{s}t{t}"
                body = [{"role": "user", "content": text}] if cfg.chat else text
                keys = ((f"group:g{g}",) if t == 0 else ()) + (f"session:g{g}s{s}",)
                turns.append(Request(rid, body, n=1, sampling=sampling, affinity=keys if cfg.affinity else None,
                                     metadata={PROMPT_KEY: ctx, OUTPUT_KEY: (out,), CONTENT_KEY: content}))
                ctx += out + cfg.tool_tokens
                content += ((output_segment(rid, 0), out), (("tool", g, s, t), cfg.tool_tokens))
            sessions.append(Session(g, tuple(turns)))
    return sessions


def total_output_tokens(sessions: list[Session]) -> int:
    return sum(sum(r.metadata[OUTPUT_KEY]) for s in sessions for r in s.turns)
