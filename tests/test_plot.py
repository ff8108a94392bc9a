"""`rollout-plugin plot`: timeline JSONL loading (forward compatible, file:line errors) and the PNG it draws."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_plugin.cli.main import main
from rollout_plugin.errors import InputError
from rollout_plugin.viz import describe, load_timeline, plot_timeline
from rollout_plugin.viz.timeline_plot import _shape, cap_steps


def synthetic_timeline(engines: int = 3, seconds: float = 150.0, interval: float = 0.5,
                       dies: dict[str, float] | None = None, no_metrics: tuple[str, ...] = ("engine2",)) -> list[dict]:
    """A run shaped like the controller's: caps rise while throughput does, cut on KV pressure or preemption."""
    dies = {"engine1": 95.0} if dies is None else dies
    names = [f"engine{i}" for i in range(engines)]
    records: list[dict] = [{"kind": "meta", "started_at": 1_760_000_000.0, "engines": names,
                            "title": "collect qwen2.5-7b ×3 engines, k=8"}]
    caps = {n: 256 for n in names}
    preempt = {n: 0.0 for n in names}
    changes: list[dict] = []
    steps = int(seconds / interval)
    for step in range(steps):
        t = round(step * interval, 3)
        queued = max(0, int(600 - 4 * t))
        for i, name in enumerate(names):
            if name in dies and t >= dies[name]:
                continue
            cap = caps[name]
            inflight = min(cap, int(cap * (0.95 + 0.05 * math.sin(t / 3 + i))) if queued else int(cap * 0.4))
            kv = min(0.99, inflight / 420 + 0.05 * math.sin(t / 5))
            running, waiting = min(inflight, 300), max(0, inflight - 300)
            tps = 40 * running * (1 - max(0.0, kv - 0.85))
            if step % 10 == 9 and queued and kv < 0.85:  # every 5 s while there is a queue and KV headroom
                new = math.ceil(cap * 1.25)
                changes.append({"kind": "cap", "t": t, "engine": name, "old": cap, "new": new,
                                "reason": f"throughput {tps:.0f} tok/s rising, {queued} samples waiting, "
                                          "engine queue empty"})
                caps[name] = new
            elif step % 10 == 4 and kv > 0.93 and name not in no_metrics:
                new = math.floor(cap * 0.7)
                changes.append({"kind": "cap", "t": t, "engine": name, "old": cap, "new": new,
                                "reason": f"KV usage {kv:.0%} > 93%"})
                caps[name] = new
            elif step % 37 == 0 and waiting > 40 and name not in no_metrics:
                preempt[name] += 3
                new = math.floor(cap * 0.7)
                changes.append({"kind": "cap", "t": t, "engine": name, "old": cap, "new": new,
                                "reason": "preemptions +3"})
                caps[name] = new
            metrics = name not in no_metrics
            records.append({"kind": "sample", "t": t, "engine": name, "inflight": inflight, "cap": cap,
                            "queued": queued, "kv_usage": round(kv, 4) if metrics else None,
                            "running": running if metrics else None, "waiting": waiting if metrics else None,
                            "preemptions": preempt[name] if metrics else None,
                            "tokens_per_s": round(tps, 1), "future_field": {"ignored": True}})
            records.extend(changes)
            changes.clear()
    for name, at in dies.items():
        records.append({"kind": "health", "t": at, "engine": name, "old": "healthy", "new": "dead",
                        "reason": "connection refused (engine process exited with code -9)"})
    records.append({"kind": "rollover", "t": 3.0, "note": "a kind this plotter does not know"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_multi_engine_run_renders_a_sane_png(tmp_path):
    records = synthetic_timeline()
    samples = sum(r["kind"] == "sample" for r in records)
    cap_changes = sum(r["kind"] == "cap" for r in records)
    assert samples > 600 and cap_changes >= 10  # the fixture is as busy as the brief asks
    timeline = write_jsonl(tmp_path / "run.timeline.jsonl", records)

    loaded = load_timeline(timeline)
    assert len(loaded) == len(records)
    out = plot_timeline(loaded, tmp_path / "nested" / "run.png")
    assert out == tmp_path / "nested" / "run.png"
    width, height = png_size(out)
    assert 1200 <= width <= 3000 and 700 <= height <= 2500
    assert out.stat().st_size > 60_000  # drawn data, not an empty canvas


def test_more_engines_than_columns_wrap_and_a_title_overrides_meta(tmp_path):
    records = synthetic_timeline(engines=6, seconds=40, dies={}, no_metrics=())
    one_row = png_size(plot_timeline(synthetic_timeline(engines=4, seconds=40, dies={}, no_metrics=()),
                                     tmp_path / "four.png"))
    two_rows = png_size(plot_timeline(records, tmp_path / "six.png", title="six engines"))
    assert two_rows[0] == one_row[0]  # four columns either way
    assert two_rows[1] > one_row[1] * 1.6  # a second block of panels below


def test_what_the_pool_s_recorder_writes_is_what_the_plotter_reads(tmp_path):
    from rollout_plugin.pool.observe.timeline import TimelineRecorder

    recorder = TimelineRecorder(tmp_path / "pool.timeline.jsonl", ["engine0", "engine1"], t0=100.0, title="pool")
    for step in range(40):
        for name in ("engine0", "engine1"):
            recorder.sample(100.0 + step, name, inflight=30, cap=32, queued=5, kv_usage=0.5, running=30, waiting=0,
                            preemptions=float(step // 10), tokens_per_s=900.0)
    recorder.change("cap", 110.0, "engine0", 32, 40, "throughput 900 tok/s rising, 5 samples waiting")
    recorder.change("health", 120.0, "engine1", "healthy", "dead", "connection refused")
    recorder.close()
    records = load_timeline(recorder.path)
    assert describe(records) == "2 engine(s), 80 samples, 1 cap change(s), 1 health change(s) over 39 s"
    assert png_size(plot_timeline(records, tmp_path / "pool.png"))[0] > 800


def test_a_single_engine_without_changes_still_draws(tmp_path):
    records = [{"kind": "sample", "t": i * 1.0, "engine": "api", "inflight": 8, "cap": 8, "queued": 0}
               for i in range(30)]
    width, height = png_size(plot_timeline(records, tmp_path / "one.png"))
    assert width >= 400 and height >= 600


def test_unknown_kinds_and_fields_are_ignored_but_a_bad_line_is_named(tmp_path):
    good = synthetic_timeline(engines=1, seconds=5, dies={}, no_metrics=())
    lines = [json.dumps(r) for r in good]
    lines.insert(3, json.dumps({"kind": "sample", "t": 1.0, "engine": "engine0", "kv_usage": "high"}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{path}:4: sample field 'kv_usage' must be a number or null"):
        load_timeline(path)

    lines[3] = '{"kind": "cap", "t": 2.0, "engine": "engine0", "new": 9'  # truncated mid-file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{path}:4: not valid JSON"):
        load_timeline(path)

    lines[3] = '["not", "an", "object"]'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{path}:4: expected a JSON object, got list"):
        load_timeline(path)

    with pytest.raises(InputError, match="timeline file not found"):
        load_timeline(tmp_path / "missing.jsonl")


def test_a_half_written_last_line_is_skipped_as_a_live_run(tmp_path):
    records = synthetic_timeline(engines=1, seconds=5, dies={}, no_metrics=())
    path = tmp_path / "live.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "sample", "t": 5.')
    assert load_timeline(path) == records


def test_records_without_samples_are_refused(tmp_path):
    with pytest.raises(InputError, match="no sample records"):
        plot_timeline([{"kind": "meta", "engines": ["engine0"]}], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"record #2: sample record needs a number 't'"):
        plot_timeline([{"kind": "meta"}, {"kind": "sample", "engine": "e"}], tmp_path / "x.png")


def test_the_cap_line_follows_change_records_even_when_a_sample_lags():
    records = [{"kind": "sample", "t": 1.0, "engine": "e", "cap": 100},
               {"kind": "cap", "t": 2.0, "engine": "e", "old": 100, "new": 70, "reason": "KV usage 97% > 95%"},
               {"kind": "sample", "t": 2.0, "engine": "e", "cap": 100},  # polled before the cut landed
               {"kind": "sample", "t": 3.0, "engine": "e", "cap": 70},
               {"kind": "sample", "t": 4.0, "engine": "e", "cap": 70}]
    _, engines = _shape(records)
    # At t=2 the line steps to 70 and stays there: the change record comes after the lagging sample.
    assert cap_steps(engines["e"]) == [(1.0, 100), (2.0, 100), (2.0, 70), (3.0, 70), (4.0, 70)]
    _, engines = _shape(records[:3])
    assert cap_steps(engines["e"])[-1] == (2.0, 70)


def test_describe_counts_what_was_drawn():
    text = describe(synthetic_timeline(engines=2, seconds=20, dies={"engine1": 10.0}))
    assert text.startswith("2 engine(s), ") and "1 health change(s) over 20 s" in text


def test_cli_plot_defaults_output_next_to_the_timeline(tmp_path, capsys):
    timeline = write_jsonl(tmp_path / "run.timeline.jsonl", synthetic_timeline(engines=2, seconds=30))
    assert main(["plot", f"timeline={timeline}"]) == 0
    out = tmp_path / "run.timeline.png"
    assert png_size(out)[0] > 800
    assert str(out) in capsys.readouterr().out


def test_cli_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot"]) == 2
    assert "timeline=None: required" in capsys.readouterr().err
    assert main(["plot", f"timeline={tmp_path / 'nope.jsonl'}"]) == 2
    assert "timeline file not found" in capsys.readouterr().err
    assert main(["plot", "timelin=x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and "(try timeline=…)" in err
    assert main(["plot", "timeline=x.jsonl", "dpi=20"]) == 2
    assert "dpi=20: must be in [50, 400] (try dpi=50)" in capsys.readouterr().err


def test_cli_plot_end_to_end_in_a_fresh_process(tmp_path):
    timeline = write_jsonl(tmp_path / "run.timeline.jsonl", synthetic_timeline(engines=2, seconds=30))
    out = tmp_path / "out" / "run.png"
    proc = subprocess.run([sys.executable, "-m", "rollout_plugin.cli.main", "plot", f"timeline={timeline}",
                           f"output={out}", "title=end to end"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "2 engine(s)" in proc.stdout
    assert png_size(out)[0] > 800

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "meta"}\n{oops\n{"kind": "meta"}\n')
    proc = subprocess.run([sys.executable, "-m", "rollout_plugin.cli.main", "plot", f"timeline={bad}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rollout-plugin plot: error: {bad}:2: not valid JSON " \
                                  "(Expecting property name enclosed in double quotes at column 2)"


def test_importing_the_viz_package_does_not_import_matplotlib():
    code = "import sys, rollout_plugin.viz, rollout_plugin.cli.plot; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


if __name__ == "__main__":  # render the example by hand: python tests/test_plot.py /tmp/plot_check.png
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/plot_check.png")
    print(plot_timeline(synthetic_timeline(), target))
