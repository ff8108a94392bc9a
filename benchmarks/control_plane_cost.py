"""CPU the pool's process spends per unit of control-plane work that the simulator does not pay (docs/scale.md).

    .venv/bin/python benchmarks/control_plane_cost.py

1. One ``/metrics`` scrape parsed by the monitor (``telemetry.parse_vllm_metrics``) on a vLLM-0.32-shaped text:
   every ``vllm:`` family ``vllm/v1/metrics/loggers.py`` declares, its histograms with vLLM's bucket count —
   parsed whole (what the monitor did before session 8) and as the monitor does now, its lines filtered first to
   the series it reads (``telemetry.read_lines``, the fix ``docs/scale.md`` proposed).
   The simulator hands the monitor parsed numbers (``sim.runner.parsed_metrics``), so it never pays this.
2. One GRPO answer decoded by the HTTP client (``json.loads`` + ``client._group_choices``): n = 8 samples of
   656 tokens (the multi-step run's mean) with token ids, logprobs and text, as vLLM's completions API answers.

CPU is ``time.process_time`` (this process only), so a loaded machine stretches it less than wall time would.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rollout_plugin.pool.transport.http import _group_choices
from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics

BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
           80.0, 160.0, 640.0, 2560.0]  # vLLM's time_to_first_token buckets (22): its histograms are this size


def vllm_metrics_text() -> str:
    import vllm

    src = (Path(vllm.__file__).parent / "v1/metrics/loggers.py").read_text()
    names = sorted(set(re.findall(r'"(vllm:[a-z_]+)"', src)))
    hists = set(re.findall(r'_histogram_cls\(\s*name="(vllm:[a-z_]+)"', src))
    reg, labels = CollectorRegistry(), ["model_name", "engine"]
    for name in names:
        base = name.replace("vllm:", "vllm_")
        if name in hists or name.endswith("_seconds") or "tokens_request" in name:
            Histogram(base, "x", labels, buckets=BUCKETS, registry=reg).labels("m", "0").observe(1.0)
        elif name.endswith("_total"):
            Counter(base[:-6], "x", labels, registry=reg).labels("m", "0").inc(5)
        else:
            Gauge(base, "x", labels, registry=reg).labels("m", "0").set(3)
    text = generate_latest(reg).decode().replace("vllm_", "vllm:")
    return text + 'vllm:cache_config_info{block_size="16",num_gpu_blocks="25000"} 1.0\n'


def cpu_per(fn, reps: int) -> float:
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def answer(rng: random.Random, n: int, tokens: int, prompt: int, logprobs: bool) -> bytes:
    choices = []
    for i in range(n):
        ids = [rng.randrange(128_000) for _ in range(tokens)]
        c = {"index": i, "text": "word " * tokens, "token_ids": ids, "finish_reason": "stop",
             "prompt_token_ids": [rng.randrange(128_000) for _ in range(prompt)]}
        if logprobs:
            c["logprobs"] = {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-rng.random() for _ in ids],
                             "top_logprobs": None, "text_offset": list(range(0, 5 * tokens, 5))}
        choices.append(c)
    return json.dumps({"id": "cmpl", "choices": choices, "usage": {"prompt_tokens": prompt}}).encode()


def main() -> None:
    text = vllm_metrics_text()
    full = cpu_per(lambda: list(text_string_to_metric_families(text)), 200)  # the whole text, as before

    def filtered():
        return parse_vllm_metrics(text)  # the monitor's path: read_lines, then the parse

    assert filtered().running is not None and filtered().kv_tokens  # (this text declares every family a gauge)
    print(f"/metrics: {text.count(chr(10))} lines, {len(text) / 1024:.0f} KiB: parse {full * 1e3:.2f} ms CPU; "
          f"lines filtered first: {cpu_per(filtered, 200) * 1e3:.3f} ms")
    rng = random.Random(0)
    n, tokens = 8, 656
    for logprobs in (True, False):
        body = answer(rng, n, tokens, 300, logprobs)

        def decode():
            data = json.loads(body)
            _group_choices(data["choices"], data["usage"], 1, n, chat=False)

        cpu = cpu_per(decode, 40)
        print(f"answer n={n} x {tokens} tokens, logprobs={logprobs}: {len(body) / 1024:.0f} KiB, {cpu * 1e3:.2f} ms "
              f"CPU per call, {cpu / (n * tokens) * 1e6:.2f} us per token")


if __name__ == "__main__":
    main()
