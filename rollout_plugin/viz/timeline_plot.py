"""The pool's timeline (JSONL) drawn as one PNG: per engine, in-flight vs cap, KV/scheduler, tokens/s.

Record kinds (written by :mod:`rollout_plugin.pool.timeline`; ``t`` is seconds since the run started):
``meta`` (title, engines, started_at), ``sample`` (per engine per poll), ``cap`` and ``health``
(old -> new with a reason). Unknown kinds and fields are ignored so older plotters read newer files.

Layout: one column per engine (wrapping after four), each a status strip (health bands, cap-change
ticks lettered by reason) over three panels sharing the time axis. Cap-change reasons carry numbers
("throughput 5400 tok/s rising …"), so they are grouped by their wording with numbers as ranges, and
the key under the figure spells each letter out once instead of crowding text into the panels.

matplotlib is imported lazily and only through its object API (Figure + Agg canvas): no pyplot
state, no backend switch in the caller's process.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_plugin.errors import InputError, RolloutPluginError

log = logging.getLogger(__name__)

MATPLOTLIB_REQUIREMENT = "matplotlib>=3.8"
MAX_COLUMNS = 4
MAX_KEY_LINES = 18
REASON_CHARS = 110

_SAMPLE_NUMBERS = ("inflight", "cap", "queued", "kv_usage", "running", "waiting", "preemptions", "tokens_per_s")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

# Health states: anything that is not healthy is shaded; dead in red, the rest (suspect, draining…) amber.
_HEALTH_COLORS = {"healthy": "#cfe8cf", "dead": "#d62728"}
_OTHER_HEALTH = "#ff9f1c"
_UP, _DOWN = "#2ca02c", "#d62728"


# -- loading ------------------------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: object) -> str | None:
    """Why ``record`` cannot be drawn, or None. Unknown kinds and extra fields are fine."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    kind = record.get("kind")
    if not isinstance(kind, str):
        return "record has no string 'kind'"
    if kind == "meta":
        engines = record.get("engines")
        if engines is not None and not (isinstance(engines, list) and all(isinstance(e, str) for e in engines)):
            return f"meta 'engines' must be a list of names, got {engines!r}"
        return None
    if kind not in ("sample", "cap", "health"):
        return None
    if not _is_number(record.get("t")) or not math.isfinite(record["t"]):
        return f"{kind} record needs a number 't' (seconds since start), got {record.get('t')!r}"
    if not isinstance(record.get("engine"), str):
        return f"{kind} record needs a string 'engine', got {record.get('engine')!r}"
    if kind == "sample":
        for name in _SAMPLE_NUMBERS:
            if record.get(name) is not None and not _is_number(record[name]):
                return f"sample field {name!r} must be a number or null, got {record[name]!r}"
    elif kind == "cap":
        for name in ("old", "new"):
            if record.get(name) is not None and not _is_number(record[name]):
                return f"cap field {name!r} must be a number, got {record[name]!r}"
        if record.get("new") is None:
            return "cap record needs 'new' (the cap after the change)"
    elif not isinstance(record.get("new"), str):
        return f"health record needs a string 'new' (the state after the change), got {record.get('new')!r}"
    return None


def load_timeline(path: str | Path) -> list[dict]:
    """Read a timeline JSONL; a malformed line is an :class:`InputError` naming ``file:line``.

    A last line without its newline that does not parse is the writer caught mid-line (plotting a
    run that is still going): it is skipped with a warning rather than refused.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"timeline file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read timeline {path}: {exc}") from None
    lines = text.split("\n")
    records: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: still being written
                log.warning("%s:%d: skipping a partly written last line", path, number)
                continue
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        problem = record_problem(record)
        if problem:
            raise InputError(f"{path}:{number}: {problem}")
        records.append(record)
    return records


# -- shaping ------------------------------------------------------------------------------------------

@dataclass
class _Change:
    t: float
    old: Any
    new: Any
    reason: str


@dataclass
class _Engine:
    name: str
    columns: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("t", *_SAMPLE_NUMBERS)})
    caps: list[_Change] = field(default_factory=list)
    health: list[_Change] = field(default_factory=list)


def _shape(records: list[dict]) -> tuple[dict, dict[str, _Engine]]:
    meta: dict = {}
    engines: dict[str, _Engine] = {}
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise InputError(f"timeline record #{i + 1}: {problem}")
        kind = record["kind"]
        if kind == "meta":
            meta = meta or record  # the first meta wins; a resumed run may append another
            for name in record.get("engines") or []:
                engines.setdefault(name, _Engine(name))
        elif kind in ("sample", "cap", "health"):
            engine = engines.setdefault(record["engine"], _Engine(record["engine"]))
            if kind == "sample":
                engine.columns["t"].append(float(record["t"]))
                for name in _SAMPLE_NUMBERS:
                    value = record.get(name)
                    engine.columns[name].append(math.nan if value is None else float(value))
            else:
                change = _Change(float(record["t"]), record.get("old"), record["new"], str(record.get("reason") or ""))
                (engine.caps if kind == "cap" else engine.health).append(change)
    for engine in engines.values():
        order = sorted(range(len(engine.columns["t"])), key=engine.columns["t"].__getitem__)
        engine.columns = {k: [v[j] for j in order] for k, v in engine.columns.items()}
        engine.caps.sort(key=lambda c: c.t)
        engine.health.sort(key=lambda c: c.t)
    return meta, engines


def _template(reason: str) -> str:
    return _NUMBER.sub("#", reason.strip()) or "(no reason given)"


def _summarise_reasons(reasons: list[str]) -> str:
    """Reasons sharing a wording, numbers kept where they agree and shown as ranges where they vary."""
    parts = [[float(n) for n in _NUMBER.findall(r)] for r in reasons]
    pieces = _NUMBER.split(reasons[0].strip())
    out = pieces[0]
    for j, tail in enumerate(pieces[1:]):
        lo, hi = min(p[j] for p in parts), max(p[j] for p in parts)
        out += f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"
        out += tail
    out = out or "(no reason given)"
    return out if len(out) <= REASON_CHARS else out[:REASON_CHARS - 1] + "…"


def _letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        s, i = "", i + 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        out.append(s)
    return out


def _direction(change: _Change) -> int:
    if _is_number(change.old) and _is_number(change.new):
        return (change.new > change.old) - (change.new < change.old)
    return 0


def _health_spans(engine: _Engine, end: float) -> list[tuple[float, float, str]]:
    """(start, end, state) bands; before the first change the engine is taken as its first ``old`` state."""
    if not engine.health:
        return [(0.0, end, "healthy")]
    spans, state, start = [], str(engine.health[0].old or "healthy"), 0.0
    for change in engine.health:
        spans.append((start, change.t, state))
        start, state = change.t, str(change.new)
    spans.append((start, end, state))
    return [s for s in spans if s[1] > s[0]]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def describe(records: list[dict]) -> str:
    """One line for the CLI: engines, samples, changes, duration."""
    _, engines = _shape(records)
    samples = sum(len(e.columns["t"]) for e in engines.values())
    caps = sum(len(e.caps) for e in engines.values())
    health = sum(len(e.health) for e in engines.values())
    end = max([0.0, *(t for e in engines.values() for t in e.columns["t"]),
               *(c.t for e in engines.values() for c in e.caps + e.health)])
    return (f"{len(engines)} engine(s), {samples} samples, {caps} cap change(s), "
            f"{health} health change(s) over {_duration(end)}")


# -- drawing ------------------------------------------------------------------------------------------

def plot_timeline(records: list[dict], out_png: str | Path, title: str | None = None, *, dpi: int = 110) -> Path:
    """Render ``records`` (as :func:`load_timeline` returns them) to ``out_png``; returns its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator, PercentFormatter
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        raise RolloutPluginError(f"plotting needs matplotlib: pip install '{MATPLOTLIB_REQUIREMENT}'") from None

    meta, engines = _shape(records)
    if not any(e.columns["t"] for e in engines.values()):
        raise InputError("the timeline has no sample records to draw (did the run get past its first poll?)")
    names = list(engines)
    end = max([*(t for e in engines.values() for t in e.columns["t"]),
               *(c.t for e in engines.values() for c in e.caps + e.health)])
    end = max(end, 1e-3)
    # Long runs read better in minutes; the data stay in seconds, only the axis is scaled.
    scale, unit = (60.0, "min") if end > 1200 else (1.0, "s")

    # Cap-change reasons grouped by wording, lettered in order of first appearance.
    groups: dict[str, list[tuple[str, _Change]]] = {}
    for name in names:
        for change in engines[name].caps:
            groups.setdefault(_template(change.reason), []).append((name, change))
    letter_of = dict(zip(groups, _letters(len(groups))))

    ncols = min(len(names), MAX_COLUMNS)
    blocks = math.ceil(len(names) / ncols)
    key_lines = _key_lines(engines, groups, letter_of, scale, unit)
    heights = [0.42, 1.7, 1.35, 1.2] * blocks + [0.45, 0.2 + 0.2 * len(key_lines)]
    fig = Figure(figsize=(1.0 + 4.6 * ncols, sum(heights) + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)

    heading = title or meta.get("title") or "rollout timeline"
    sub = [_count(len(names), "engine"), _duration(end)]
    if _is_number(meta.get("started_at")):
        started = _dt.datetime.fromtimestamp(meta["started_at"], tz=_dt.timezone.utc)
        sub.insert(0, "started " + started.strftime("%Y-%m-%d %H:%M:%S UTC"))
    sub.append(_count(sum(len(e.caps) for e in engines.values()), "cap change"))
    sub.append(_count(sum(len(e.health) for e in engines.values()), "health change"))
    fig.suptitle(f"{heading}\n{'  ·  '.join(sub)}", fontsize=12)

    first: dict[str, Any] = {}  # the first axes of each kind: every later one shares with it
    for index, name in enumerate(names):
        engine = engines[name]
        block, col = divmod(index, ncols)
        row = 4 * block
        last_col = col == ncols - 1 or index == len(names) - 1

        def axes(offset: int, kind: str, *, share_y: bool = True) -> Any:
            ax = fig.add_subplot(grid[row + offset, col], sharex=first.get("x"),
                                 sharey=first.get(kind) if share_y else None)
            first.setdefault("x", ax)
            first.setdefault(kind, ax)
            return ax

        strip = axes(0, "strip")
        ax_load, ax_kv, ax_tps = axes(1, "load"), axes(2, "kv"), axes(3, "tps")
        spans = _health_spans(engine, end)
        cols = {k: v for k, v in engine.columns.items()}
        t = [x / scale for x in cols["t"]]

        # Status strip: health as coloured bands below, cap changes as lettered ticks above.
        strip.set_ylim(0, 1)
        strip.set_yticks([])
        strip.tick_params(labelbottom=False, bottom=False)
        for spine in ("top", "right", "left"):
            strip.spines[spine].set_visible(False)
        for start, stop, state in spans:
            color = _HEALTH_COLORS.get(state, _OTHER_HEALTH)
            strip.axvspan(start / scale, stop / scale, 0.0, 0.42, color=color, lw=0)
            width = (stop - start) / end
            if width * 4.6 * 72 > 7 * len(state) + 6:  # room for the word (about 7 pt per character)
                strip.text((start + stop) / 2 / scale, 0.21, state, ha="center", va="center", fontsize=8,
                           color="white" if state == "dead" else "0.25", clip_on=True)
        last_x = -math.inf
        for change in engine.caps:
            color = {1: _UP, -1: _DOWN}.get(_direction(change), "0.4")
            strip.vlines(change.t / scale, 0.47, 0.62, color=color, lw=1.2)
            x = change.t / end
            if x - last_x > 0.035:  # letters closer than ~one character width would overlap
                strip.text(change.t / scale, 0.66, letter_of[_template(change.reason)], ha="center", va="bottom",
                           fontsize=7.5, color=color, fontweight="bold", clip_on=False)
                last_x = x
        state_now = spans[-1][2] if spans else "healthy"
        status = state_now if state_now == "healthy" else f"{state_now} at {_fmt_t(spans[-1][0], scale, unit)}"
        strip.set_title(f"{name}  ·  {status}", fontsize=11, fontweight="bold", loc="left",
                        color="#a01010" if state_now == "dead" else "black")

        # Unhealthy time shaded behind the data in every panel.
        for ax in (ax_load, ax_kv, ax_tps):
            for start, stop, state in spans:
                if state != "healthy":
                    ax.axvspan(start / scale, stop / scale, color=_HEALTH_COLORS.get(state, _OTHER_HEALTH),
                               alpha=0.12, lw=0)
            for change in engine.health:
                ax.axvline(change.t / scale, color="#a01010" if change.new == "dead" else "0.4", lw=1.0, ls="--")
            if len(engine.caps) <= 40:  # beyond that the guides are a grey wash
                for change in engine.caps:
                    ax.axvline(change.t / scale, color="0.75", lw=0.6, ls=":", zorder=0)

        # (1) in-flight against the cap; the pool's queue behind them.
        cap_points = sorted([(x, c) for x, c in zip(cols["t"], cols["cap"]) if not math.isnan(c)]
                            + [(c.t, float(c.new)) for c in engine.caps])
        if cap_points:
            if cols["t"] and cols["t"][-1] > cap_points[-1][0]:
                cap_points.append((cols["t"][-1], cap_points[-1][1]))
            ax_load.step([p[0] / scale for p in cap_points], [p[1] for p in cap_points], where="post",
                         color="black", lw=1.6, label="cap (per engine)", zorder=3)
            moves = [(c.t / scale, float(c.new), _direction(c)) for c in engine.caps]
            for direction, marker, color in ((1, "^", _UP), (-1, "v", _DOWN)):
                pts = [(x, y) for x, y, d in moves if d == direction]
                if pts:
                    ax_load.scatter(*zip(*pts), marker=marker, color=color, s=28, zorder=4, edgecolors="white",
                                    linewidths=0.5)
        ax_load.fill_between(t, cols["queued"], color="#ff7f0e", alpha=0.13, lw=0)
        ax_load.plot(t, cols["queued"], color="#ff7f0e", lw=1.0, label="queued in pool")
        ax_load.plot(t, cols["inflight"], color="#1f77b4", lw=1.4, label="in-flight")
        ax_load.set_title("in-flight vs cap, pool queue", fontsize=9, loc="left", color="0.3")
        ax_load.set_ylim(bottom=0)
        ax_load.yaxis.set_major_locator(MaxNLocator(5, integer=True))

        # (2) KV-cache usage (left, 0–100 %) and the engine's scheduler (right, sequences).
        ax_kv.plot(t, cols["kv_usage"], color="#9467bd", lw=1.4, label="KV cache usage")
        ax_kv.set_ylim(0, 1.05)
        ax_kv.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax_kv.set_title("KV cache and engine scheduler", fontsize=9, loc="left", color="0.3")
        ax_seq = ax_kv.twinx()
        if "seq" in first:
            ax_seq.sharey(first["seq"])
        first.setdefault("seq", ax_seq)
        ax_seq.plot(t, cols["running"], color="#17becf", lw=1.1, label="running (engine)")
        ax_seq.plot(t, cols["waiting"], color="#8c564b", lw=1.1, ls="--", label="waiting (engine)")
        ax_seq.set_ylim(bottom=0)
        ax_seq.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        bumps = _increments(cols["t"], cols["preemptions"])
        if bumps:
            ax_kv.plot([x / scale for x in bumps], [0.03] * len(bumps), ls="none", marker="|", ms=9,
                       color="crimson", mew=1.5, label="preemption", zorder=5)
        if all(math.isnan(v) for v in cols["kv_usage"] + cols["running"] + cols["waiting"]):
            _note(ax_kv, "no engine metrics (/metrics not exposed)")

        # (3) generation throughput.
        ax_tps.plot(t, cols["tokens_per_s"], color="#2ca02c", lw=1.3, label="tokens/s")
        ax_tps.set_ylim(bottom=0)
        ax_tps.set_title("generation throughput", fontsize=9, loc="left", color="0.3")
        ax_tps.set_xlabel(f"time since start ({unit})")
        if all(math.isnan(v) for v in cols["tokens_per_s"]):
            _note(ax_tps, "no throughput measured")
        if not cols["t"]:
            _note(ax_load, "no samples for this engine")

        for ax in (ax_load, ax_kv, ax_tps):
            ax.grid(True, color="0.92", lw=0.6)
            ax.set_xlim(0, end / scale * 1.01)
        for ax in (ax_load, ax_kv):
            ax.tick_params(labelbottom=False)
        if col == 0:
            ax_load.set_ylabel("samples")
            ax_kv.set_ylabel("KV cache used")
            ax_tps.set_ylabel("tokens / s")
        else:  # shared with column 0: the numbers are on the left already
            for ax in (ax_load, ax_kv, ax_tps):
                ax.tick_params(labelleft=False)
        if last_col:
            ax_seq.set_ylabel("sequences")

    # One legend for every panel, then the key to the letters and the health changes.
    legend_ax = fig.add_subplot(grid[-2, :])
    legend_ax.axis("off")
    handles = [
        Line2D([], [], color="#1f77b4", lw=1.4, label="in-flight"),
        Line2D([], [], color="black", lw=1.6, drawstyle="steps-post", label="cap"),
        Patch(facecolor="#ff7f0e", alpha=0.35, edgecolor="#ff7f0e", label="queued in pool"),
        Line2D([], [], color="#9467bd", lw=1.4, label="KV cache usage"),
        Line2D([], [], color="#17becf", lw=1.1, label="running"),
        Line2D([], [], color="#8c564b", lw=1.1, ls="--", label="waiting"),
        Line2D([], [], ls="none", marker="|", ms=9, mew=1.5, color="crimson", label="preemption"),
        Line2D([], [], color="#2ca02c", lw=1.3, label="tokens/s"),
        Line2D([], [], ls="none", marker="^", color=_UP, label="cap raised"),
        Line2D([], [], ls="none", marker="v", color=_DOWN, label="cap cut"),
        Patch(facecolor=_HEALTH_COLORS["dead"], alpha=0.5, label="engine dead"),
        Patch(facecolor=_OTHER_HEALTH, alpha=0.5, label="engine degraded"),
    ]
    legend_ax.legend(handles=handles, loc="center", ncol=min(6, 2 * ncols + 2), fontsize=8.5, frameon=False)
    key_ax = fig.add_subplot(grid[-1, :])
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key_lines), transform=key_ax.transAxes, va="top", ha="left",
                fontsize=8.5, linespacing=1.45, family="DejaVu Sans")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor="white")
    log.info("wrote %s", out)
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_t(seconds: float, scale: float, unit: str) -> str:
    return f"{seconds / scale:.1f} {unit}"


def _increments(ts: list[float], totals: list[float]) -> list[float]:
    """Times at which a cumulative counter rose (a drop is a restarted engine: its new value counts)."""
    out, prev = [], None
    for t, total in zip(ts, totals):
        if math.isnan(total):
            continue
        if prev is not None and total != prev:
            out.append(t)
        prev = total
    return out


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.5",
            style="italic")


def _key_lines(engines: dict[str, _Engine], groups: dict[str, list[tuple[str, _Change]]],
               letter_of: dict[str, str], scale: float, unit: str) -> list[str]:
    lines = []
    if groups:
        lines.append("Cap changes (letters in each engine's strip; ▲ raised, ▼ cut):")
        shown = list(groups.items())[:MAX_KEY_LINES]
        for template, members in shown:
            ups = sum(_direction(c) > 0 for _, c in members)
            downs = sum(_direction(c) < 0 for _, c in members)
            counts = "  ".join(s for s in (f"▲{ups}" if ups else "", f"▼{downs}" if downs else "") if s)
            per_engine = {}
            for name, _ in members:
                per_engine[name] = per_engine.get(name, 0) + 1
            where = ", ".join(f"{n} ×{k}" for n, k in per_engine.items())
            reason = _summarise_reasons([c.reason for _, c in members])
            lines.append(f"   {letter_of[template]}   {counts:<9}  {reason}   [{where}]")
        if len(groups) > len(shown):
            lines.append(f"   … and {len(groups) - len(shown)} more kinds of reason")
    health = [(name, c) for name, e in engines.items() for c in e.health]
    if health:
        lines.append("Health changes:")
        for name, c in sorted(health, key=lambda p: p[1].t)[:MAX_KEY_LINES]:
            reason = c.reason if len(c.reason) <= REASON_CHARS else c.reason[:REASON_CHARS - 1] + "…"
            lines.append(f"   {name} at {_fmt_t(c.t, scale, unit)}:  {c.old} → {c.new}" + (f"  ({reason})" if reason else ""))
        if len(health) > MAX_KEY_LINES:
            lines.append(f"   … and {len(health) - MAX_KEY_LINES} more")
    return lines or ["No cap or health changes in this run."]
