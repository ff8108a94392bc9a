"""Doctor rules on synthetic runs: each deliberately wrong run gets its finding and override, a good one none."""

from __future__ import annotations

from rollout_plugin.doctor import diagnose, run_facts


def tl(engine: str, n: int = 20, **fields) -> list[dict]:
    base = {"inflight": 8, "cap": 10, "queued": 0, "kv_usage": 0.4, "running": 8, "waiting": 0,
            "preemptions": 0.0, "tokens_per_s": 1000.0}
    return [{"kind": "sample", "t": float(i), "engine": engine, **{**base, **fields}} for i in range(n)]


def summary(*names: str, cap: int = 10, **fields) -> dict:
    return {"k": 1, "samples": 100, "generation_s": 20.0, "verify_wait_s": 0.0, "verify_timing": "inline",
            "engines": [{"name": n, "cap": cap, "samples": 50, "output_tokens": 5000} for n in names], **fields}


def codes(findings) -> list[tuple[str, str | None]]:
    return [(f.code, f.engine) for f in findings]


def test_a_healthy_run_has_no_findings():
    assert diagnose(run_facts(summary("e0"), tl("e0"))) == []


def test_cap_one_is_underfed_by_the_global_limit():
    found = diagnose(run_facts(summary("e0", cap=2), tl("e0", inflight=1, cap=2, queued=30, running=1,
                                                        kv_usage=0.01)))
    assert codes(found) == [("underfed-global", None)]
    assert "pool.max_concurrent=2" in found[0].override and "1.0/2" in found[0].evidence


def test_engine_at_its_cap_with_work_queued_and_kv_room():
    found = diagnose(run_facts(summary("e0"), tl("e0", inflight=10, queued=50, running=10, kv_usage=0.2)))
    assert codes(found) == [("underfed-cap", "e0")]
    assert found[0].override.startswith("pool.per_engine=20")


def test_preemptions_mean_kv_pressure():
    found = diagnose(run_facts(summary("e0"), tl("e0") + [{**tl("e0")[0], "t": 99.0, "preemptions": 12.0}]))
    assert codes(found) == [("kv-pressure", "e0")]
    assert "12 preemptions" in found[0].evidence and "pool.per_engine=7" in found[0].override
    assert "gpu_memory_utilization" in found[0].override


def test_kv_mostly_empty_while_vllm_queues_means_max_num_seqs():
    found = diagnose(run_facts(summary("e0"), tl("e0", kv_usage=0.1, waiting=6, running=8)))
    assert codes(found) == [("kv-idle", "e0")]
    assert found[0].override == "engine.max_num_seqs=16"


def test_batches_not_filling():
    found = diagnose(run_facts(summary("e0", "e1"), tl("e0", inflight=2, running=2) + tl("e1", inflight=2, running=2)))
    assert codes(found) == [("batch-not-filling", "e0"), ("batch-not-filling", "e1")]
    assert "pool.engines=1" in found[0].override


def test_verification_bound_run():
    found = diagnose(run_facts(summary("e0", verify_wait_s=9.0), tl("e0")))
    assert codes(found) == [("verify-bound", None)]
    assert "verify=deferred" in found[0].override and "9.0s" in found[0].evidence
    deferred = summary("e0", verify_wait_s=9.0, verify_timing="deferred")
    assert diagnose(run_facts(deferred, tl("e0"))) == []


def test_one_slow_engine_is_a_straggler():
    found = diagnose(run_facts(summary("e0", "e1", "e2"), tl("e0") + tl("e1") + tl("e2", tokens_per_s=300.0)))
    assert codes(found) == [("straggler", "e2")]
    assert "300" in found[0].evidence and "1000" in found[0].evidence


def test_idle_tail_of_the_timeline_is_ignored():
    idle = tl("e0", n=200, inflight=0, running=0, queued=0)  # verification tail: no work anywhere
    assert diagnose(run_facts(summary("e0"), tl("e0") + idle)) == []


def test_live_snapshots_name_kv_problems():
    from rollout_plugin.doctor import live_facts

    found = diagnose(live_facts({
        "http://a": {"running": 40, "waiting": 0, "kv_usage": 0.97, "preemptions": 3.0},
        "http://b": {"running": 16, "waiting": 9, "kv_usage": 0.12, "preemptions": 0.0},
        "http://c": {"running": 0, "waiting": 0, "kv_usage": 0.0, "preemptions": 0.0},
    }))
    assert codes(found) == [("kv-pressure", "http://a"), ("kv-idle", "http://b")]
    assert "pool.per_engine=28" in found[0].override and found[1].override == "engine.max_num_seqs=32"
