"""The pool's timeline (JSONL) drawn as one PNG: per engine, in-flight vs cap, KV/scheduler, tokens/s.

Record kinds (written by :mod:`rollout_plugin.pool.observe.timeline`; ``t`` is seconds since the run started):
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

# Health states: anything that is not live is shaded; dead in red, the rest (suspect, stale…) amber. Timelines
# written before the engine state machine (rollout_plugin.pool.core.lifecycle) called the live state "healthy".
_LIVE = ("live", "healthy")
_HEALTH_COLORS = {"live": "#cfe8cf", "healthy": "#cfe8cf", "dead": "#d62728"}
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


def cap_steps(engine: _Engine) -> list[tuple[float, float]]:
    """The cap over time as (t, cap) steps, from the samples' ``cap`` and the ``cap`` change records."""
    cols = engine.columns
    # Stable sort on t alone: at equal times the change record wins over a sample's (maybe stale) cap.
    points = sorted([(x, c) for x, c in zip(cols["t"], cols["cap"]) if not math.isnan(c)]
                    + [(c.t, float(c.new)) for c in engine.caps], key=lambda p: p[0])
    if points and cols["t"] and cols["t"][-1] > points[-1][0]:
        points.append((cols["t"][-1], points[-1][1]))  # hold the last cap to the last sample
    return points


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
    return _clip(out or "(no reason given)")


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
        return [(0.0, end, "live")]
    spans, state, start = [], str(engine.health[0].old or "live"), 0.0
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

@dataclass
class _Frame:
    """What every panel needs: the time scale, the end of the run, the reason letters."""

    end: float
    scale: float
    unit: str
    letter_of: dict[str, str]

    def x(self, seconds: float) -> float:
        return seconds / self.scale


def plot_timeline(records: list[dict], out_png: str | Path, title: str | None = None, *, dpi: int = 110) -> Path:
    """Render ``records`` (as :func:`load_timeline` returns them) to ``out_png``; returns its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RolloutPluginError(f"plotting needs matplotlib: pip install '{MATPLOTLIB_REQUIREMENT}'") from None

    meta, engines = _shape(records)
    if not any(e.columns["t"] for e in engines.values()):
        raise InputError("the timeline has no sample records to draw (did the run get past its first poll?)")
    names = list(engines)
    end = max(1e-3, *(t for e in engines.values() for t in e.columns["t"]),
              *(c.t for e in engines.values() for c in e.caps + e.health))
    # Cap-change reasons grouped by wording, lettered in order of first appearance.
    groups: dict[str, list[tuple[str, _Change]]] = {}
    for name in names:
        for change in engines[name].caps:
            groups.setdefault(_template(change.reason), []).append((name, change))
    # Long runs read better in minutes; the data stay in seconds, only the axis is scaled.
    frame = _Frame(end, *((60.0, "min") if end > 1200 else (1.0, "s")), dict(zip(groups, _letters(len(groups)))))

    ncols = min(len(names), MAX_COLUMNS)
    blocks = math.ceil(len(names) / ncols)
    key_lines = _key_lines(engines, groups, frame)
    heights = [0.42, 1.7, 1.35, 1.2] * blocks + [0.45, 0.2 + 0.2 * len(key_lines)]
    # At least 11 in wide: the title, legend and reason key span the figure even for one engine.
    fig = Figure(figsize=(max(11.0, 1.0 + 4.6 * ncols), sum(heights) + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)

    sub = [_count(len(names), "engine"), _duration(end),
           _count(sum(len(e.caps) for e in engines.values()), "cap change"),
           _count(sum(len(e.health) for e in engines.values()), "health change")]
    if _is_number(meta.get("started_at")):
        started = _dt.datetime.fromtimestamp(meta["started_at"], tz=_dt.timezone.utc)
        sub.insert(0, "started " + started.strftime("%Y-%m-%d %H:%M:%S UTC"))
    fig.suptitle(f"{title or meta.get('title') or 'rollout timeline'}\n{'  ·  '.join(sub)}", fontsize=12)

    def has(column: str) -> bool:
        return any(not math.isnan(v) for e in engines.values() for v in e.columns[column])

    blank = {"seq": not (has("running") or has("waiting")), "tps": not has("tokens_per_s")}
    first: dict[str, Any] = {}  # the first axes of each kind: every later one shares with it
    for index, name in enumerate(names):
        block, col = divmod(index, ncols)

        def axes(offset: int, kind: str) -> Any:
            ax = fig.add_subplot(grid[4 * block + offset, col], sharex=first.get("x"), sharey=first.get(kind))
            first.setdefault("x", ax)
            first.setdefault(kind, ax)
            return ax

        engine = engines[name]
        spans = _health_spans(engine, end)
        panels = (axes(1, "load"), axes(2, "kv"), axes(3, "tps"))
        _draw_strip(axes(0, "strip"), engine, spans, frame)
        _draw_guides(panels, engine, spans, frame)
        _draw_load(panels[0], engine, frame)
        ax_seq = panels[1].twinx()
        if "seq" in first:
            ax_seq.sharey(first["seq"])
        first.setdefault("seq", ax_seq)
        _draw_kv(panels[1], ax_seq, engine, frame)
        _draw_tps(panels[2], engine, frame)
        # Shared scales: blank ticks only when no engine at all has numbers for them.
        for ax, kind in ((ax_seq, "seq"), (panels[2], "tps")):
            if blank[kind]:
                ax.set_yticks([])
        for ax in panels:
            ax.grid(True, color="0.92", lw=0.6)
            ax.set_xlim(0, frame.x(end) * 1.01)
        for ax in panels[:2]:
            ax.tick_params(labelbottom=False)
        if col == 0:
            for ax, label in zip(panels, ("samples", "KV cache used", "tokens / s")):
                ax.set_ylabel(label)
        else:  # shared with column 0: the numbers are on the left already
            for ax in panels:
                ax.tick_params(labelleft=False)
        if col == ncols - 1 or index == len(names) - 1:
            ax_seq.set_ylabel("sequences")

    _draw_key(fig.add_subplot(grid[-2, :]), fig.add_subplot(grid[-1, :]), key_lines, ncols)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor="white")
    log.info("wrote %s", out)
    return out


def _draw_strip(ax: Any, engine: _Engine, spans: list[tuple[float, float, str]], frame: _Frame) -> None:
    """Health as coloured bands below, cap changes as ticks above, lettered by reason where room allows."""
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.tick_params(labelbottom=False, bottom=False)
    for spine in ("top", "right", "left"):
        ax.spines[spine].set_visible(False)
    for start, stop, state in spans:
        ax.axvspan(frame.x(start), frame.x(stop), 0.0, 0.42, color=_HEALTH_COLORS.get(state, _OTHER_HEALTH), lw=0)
        if (stop - start) / frame.end * 4.6 * 72 > 7 * len(state) + 6:  # room for the word (~7 pt a letter)
            ax.text(frame.x((start + stop) / 2), 0.21, state, ha="center", va="center", fontsize=8,
                    color="white" if state == "dead" else "0.25", clip_on=True)
    last = -math.inf
    for change in engine.caps:
        color = {1: _UP, -1: _DOWN}.get(_direction(change), "0.4")
        ax.vlines(frame.x(change.t), 0.47, 0.62, color=color, lw=1.2)
        if change.t / frame.end - last > 0.035:  # closer letters would overlap; the key counts them all
            ax.text(frame.x(change.t), 0.66, frame.letter_of[_template(change.reason)], ha="center",
                    va="bottom", fontsize=7.5, color=color, fontweight="bold", clip_on=False)
            last = change.t / frame.end
    state = spans[-1][2] if spans else "live"
    status = state if state in _LIVE else f"{state} at {_fmt_t(spans[-1][0], frame)}"
    ax.set_title(f"{engine.name}  ·  {status}", fontsize=11, fontweight="bold", loc="left",
                 color="#a01010" if state == "dead" else "black")


def _draw_guides(panels: tuple[Any, ...], engine: _Engine, spans: list[tuple[float, float, str]],
                 frame: _Frame) -> None:
    """Unhealthy time shaded, health changes dashed, cap changes dotted, behind the data of every panel."""
    for ax in panels:
        for start, stop, state in spans:
            if state not in _LIVE:
                ax.axvspan(frame.x(start), frame.x(stop), color=_HEALTH_COLORS.get(state, _OTHER_HEALTH),
                           alpha=0.12, lw=0)
        for change in engine.health:
            ax.axvline(frame.x(change.t), color="#a01010" if change.new == "dead" else "0.4", lw=1.0, ls="--")
        if len(engine.caps) <= 40:  # beyond that the guides are a grey wash
            for change in engine.caps:
                ax.axvline(frame.x(change.t), color="0.75", lw=0.6, ls=":", zorder=0)


def _draw_load(ax: Any, engine: _Engine, frame: _Frame) -> None:
    """(1) in-flight against the cap (a step line), the pool's queue behind them."""
    from matplotlib.ticker import MaxNLocator

    cols = engine.columns
    t = [frame.x(x) for x in cols["t"]]
    points = cap_steps(engine)
    if points:
        ax.step([frame.x(p[0]) for p in points], [p[1] for p in points], where="post", color="black", lw=2.4,
                zorder=3)
        for direction, marker, color in ((1, "^", _UP), (-1, "v", _DOWN)):
            moves = [(frame.x(c.t), float(c.new)) for c in engine.caps if _direction(c) == direction]
            if moves:
                ax.scatter(*zip(*moves), marker=marker, color=color, s=28, zorder=4, edgecolors="white",
                           linewidths=0.5)
    ax.fill_between(t, cols["queued"], color="#ff7f0e", alpha=0.13, lw=0)
    ax.plot(t, cols["queued"], color="#ff7f0e", lw=1.0)
    # Above the (thicker) cap line: an engine held at its cap shows both lines, not just the black one.
    ax.plot(t, cols["inflight"], color="#1f77b4", lw=1.1, zorder=5)
    ax.set_title("in-flight vs cap, pool queue", fontsize=9, loc="left", color="0.3")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    if not cols["t"]:
        _note(ax, "no samples for this engine")


def _draw_kv(ax: Any, ax_seq: Any, engine: _Engine, frame: _Frame) -> None:
    """(2) KV-cache usage (left, 0–100 %), the engine's running/waiting (right), preemptions as a rug."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    cols = engine.columns
    t = [frame.x(x) for x in cols["t"]]
    ax.plot(t, cols["kv_usage"], color="#9467bd", lw=1.4)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title("KV cache and engine scheduler", fontsize=9, loc="left", color="0.3")
    ax_seq.plot(t, cols["running"], color="#17becf", lw=1.1)
    ax_seq.plot(t, cols["waiting"], color="#8c564b", lw=1.1, ls="--")
    ax_seq.set_ylim(bottom=0)
    ax_seq.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    bumps = _increments(cols["t"], cols["preemptions"])
    if bumps:
        ax.plot([frame.x(x) for x in bumps], [0.03] * len(bumps), ls="none", marker="|", ms=9, color="crimson",
                mew=1.5, zorder=5)
    if all(math.isnan(v) for v in cols["kv_usage"] + cols["running"] + cols["waiting"]):
        _note(ax, "no engine metrics (/metrics not exposed)")


def _draw_tps(ax: Any, engine: _Engine, frame: _Frame) -> None:
    """(3) generation throughput."""
    cols = engine.columns
    ax.plot([frame.x(x) for x in cols["t"]], cols["tokens_per_s"], color="#2ca02c", lw=1.3)
    ax.set_ylim(bottom=0)
    ax.set_title("generation throughput", fontsize=9, loc="left", color="0.3")
    ax.set_xlabel(f"time since start ({frame.unit})")
    if all(math.isnan(v) for v in cols["tokens_per_s"]):
        _note(ax, "no throughput measured")


def _draw_key(legend_ax: Any, key_ax: Any, key_lines: list[str], ncols: int) -> None:
    """One legend for every panel, then the letters and the health changes spelt out."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color="#1f77b4", lw=1.1, label="in-flight"),
        Line2D([], [], color="black", lw=2.4, label="cap"),
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
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", ncol={1: 3, 2: 4}.get(ncols, 6), fontsize=8.5, frameon=False)
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key_lines), transform=key_ax.transAxes, va="top", ha="left", fontsize=8,
                family="DejaVu Sans Mono",  # the key is a table: columns line up
                linespacing=1.45)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_t(seconds: float, frame: _Frame) -> str:
    return f"{frame.x(seconds):.1f} {frame.unit}"


def _increments(ts: list[float], totals: list[float]) -> list[float]:
    """Times at which a cumulative counter moved (a drop is a restarted engine, which counts too)."""
    out, prev = [], None
    for t, total in zip(ts, totals):
        if not math.isnan(total):
            if prev is not None and total != prev:
                out.append(t)
            prev = total
    return out


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.5",
            style="italic")


def _clip(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


def _key_lines(engines: dict[str, _Engine], groups: dict[str, list[tuple[str, _Change]]], frame: _Frame) -> list[str]:
    lines = []
    if groups:
        lines.append("Cap changes (letters in each engine's strip; ▲ raised, ▼ cut):")
        for template, members in list(groups.items())[:MAX_KEY_LINES]:
            ups = sum(_direction(c) > 0 for _, c in members)
            downs = sum(_direction(c) < 0 for _, c in members)
            counts = "  ".join(s for s in (f"▲{ups}" if ups else "", f"▼{downs}" if downs else "") if s)
            per_engine: dict[str, int] = {}
            for name, _ in members:
                per_engine[name] = per_engine.get(name, 0) + 1
            where = ", ".join(f"{n} ×{k}" for n, k in per_engine.items())
            reason = _summarise_reasons([c.reason for _, c in members])
            lines.append(f"   {frame.letter_of[template]}   {counts:<9}  {reason}   [{where}]")
        if len(groups) > MAX_KEY_LINES:
            lines.append(f"   … and {len(groups) - MAX_KEY_LINES} more kinds of reason")
    health = sorted(((name, c) for name, e in engines.items() for c in e.health), key=lambda p: p[1].t)
    if health:
        lines.append("Health changes:")
        for name, c in health[:MAX_KEY_LINES]:
            lines.append(f"   {name} at {_fmt_t(c.t, frame)}:  {c.old} → {c.new}"
                         + (f"  ({_clip(c.reason)})" if c.reason else ""))
        if len(health) > MAX_KEY_LINES:
            lines.append(f"   … and {len(health) - MAX_KEY_LINES} more")
    return lines or ["No cap or health changes in this run."]
