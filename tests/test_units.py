"""Pure pieces: SSE parsing, Xtuner limits, routing, config checks, verifiers."""

from __future__ import annotations

import json

import pytest

from rollout_plugin.cli.app import compose
from rollout_plugin.config.schema import CollectConfig, EngineConfig, PoolConfig
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.errors import ConfigError
from rollout_plugin.pool.engines.launcher import cpu_binding
from rollout_plugin.pool.policy.limits import derive_limits, preset_per_engine_cap
from rollout_plugin.pool.policy.routing import EngineLoad, pick_engine
from rollout_plugin.pool.transport.sse import iter_events
from rollout_plugin.verify.builtin import last_number_match


def test_sse_keeps_unicode_separators_inside_events():
    text = "a\x1cb\x1dc\x1ed\x85e\u2028f\u2029g"
    payload = json.dumps({"text": text}, ensure_ascii=False).encode()
    stream = b"data: " + payload + b"\n\n" + b"data: [DONE]\n\n"
    # split the bytes at every position, including inside multi-byte characters
    for cut in range(1, len(stream)):
        events = list(iter_events([stream[:cut], stream[cut:]]))
        assert json.loads(events[0])["text"] == text and events[1] == "[DONE]"


def test_sse_line_endings_and_multiline_data():
    assert list(iter_events([b"data: a\r\ndata: b\r\n\r\n: comment\n\ndata:c\n\n"])) == ["a\nb", "c"]


@pytest.mark.parametrize("length,cap", [(2048, 1024), (4096, 1024), (4097, 512), (16384, 512), (32768, 128),
                                        (65536, 64)])
def test_xtuner_presets(length, cap):
    assert preset_per_engine_cap(length) == cap


def test_limits_follow_the_xtuner_formula():
    lim = derive_limits(max_model_len=4096, engines=8, k=16, ratio=1.2, per_engine=1024)
    assert lim.max_concurrent == int(1024 * 8 / 16 * 1.2) == 614
    assert lim.engine_inflight == lim.http_connections == 1229
    explicit = derive_limits(max_model_len=4096, engines=8, k=16, ratio=1.2, per_engine=1024, max_concurrent=600)
    assert explicit.max_concurrent == 600
    assert derive_limits(max_model_len=2048, engines=1, k=1, ratio=1.0, max_num_seqs=256).per_engine == 256


def test_routing_prefers_least_loaded_and_avoids_failed_engines():
    loads = [EngineLoad(0, 5, 10), EngineLoad(1, 2, 10), EngineLoad(2, 0, 10, healthy=False)]
    assert pick_engine(loads, 1) == 1
    assert pick_engine(loads, 1, avoid=frozenset({1})) == 0
    assert pick_engine(loads, 9) is None
    assert pick_engine([EngineLoad(0, 0, 4)], 1, avoid=frozenset({0})) == 0  # nothing else: retry there


def test_cpu_binding_splits_cores():
    assert cpu_binding(0, 1, [0, 1]) is None
    assert [cpu_binding(i, 2, [0, 1]) for i in range(2)] == ["0", "1"]
    assert [cpu_binding(i, 2, [0, 1, 2, 3]) for i in range(2)] == ["0,1", "2,3"]


def test_all_config_problems_reported_together():
    cfg = CollectConfig(engine=EngineConfig(gpu_memory_utilization=1.5, max_num_batched_tokens=512),
                        pool=PoolConfig(engines=0, k=8, per_engine=4))
    with pytest.raises(ConfigError) as info:
        validate_collect(cfg)
    keys = [p.key for p in info.value.problems]
    assert keys == ["engine.gpu_memory_utilization", "engine.max_num_batched_tokens", "pool.engines", "pool.k"]
    assert "engine.gpu_memory_utilization=1.0" in str(info.value)


def test_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="engine.model.*no such model directory"):
        validate_collect(CollectConfig(engine=EngineConfig(model=str(tmp_path / "nope"))))
    validate_collect(CollectConfig(engine=EngineConfig(model="Qwen/Qwen2.5-0.5B")))  # a hub id is fine


def test_overrides_compose_into_typed_config():
    cfg = compose("collect", ["pool.engines=2", "pool.k=4", "sampling.max_tokens=32"], CollectConfig)
    assert isinstance(cfg, CollectConfig) and (cfg.pool.engines, cfg.pool.k, cfg.sampling.max_tokens) == (2, 4, 32)


@pytest.mark.parametrize("override,expected", [
    ("pool.enginez=2", "pool.enginez='2': unknown config key (try pool.engines=…)"),
    ("+pool.foo=1", "pool.foo='1': unknown config key"),
    ("pool.k=x", "pool.k='x': Value 'x' of type 'str' could not be converted to Integer"),
    ("engine.cpu_bind=x", "expected one of [auto, off]"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        compose("collect", [override], CollectConfig)
    assert expected in str(info.value)


def test_last_number_match():
    assert last_number_match("7 + 5 = 12, so the answer is 12", {"answer": "12"}) == 1.0
    assert last_number_match("the answer is 1,024", {"answer": "1024"}) == 1.0
    assert last_number_match("12 then 13", {"answer": "12"}) == 0.0
    assert last_number_match("no digits", {"answer": "3"}) == 0.0


def test_every_package_is_listed_for_the_wheel():
    import tomllib
    from pathlib import Path

    root = Path(__file__).parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "rollout_plugin").rglob("__init__.py")}
    found |= {f"rollout_plugin.hydra_conf.{d.name}" for d in (root / "hydra_conf").iterdir()
              if d.is_dir() and not d.name.startswith("__")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
