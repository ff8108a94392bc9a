"""`rollout-plugin <command> --help | --cfg job | --info` and `--version`: answered from the schemas, nothing run."""

from __future__ import annotations

import enum
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import yaml

from rollout_plugin.cli.help import UsageError, parse_flags
from rollout_plugin.cli.main import COMMANDS, main
from rollout_plugin.config.describe import describe, yaml_key_docs

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "vllm", "transformers", "trl", "verl", "ray")
# RouterSettings (adapters/verl/router.py, being rewritten) leaves these bare; its comments are to come.
BARE_OK: set[str] = set()


def spec(name: str):
    return importlib.import_module(COMMANDS[name][0]).HELP


def sections(name: str):
    h = spec(name)
    found = h.sections() if h.sections else describe(h.schema)
    return [k for s in found for k in s.keys
            if not h.keys or any(k.key == w or k.key.startswith(w + ".") for w in h.keys)]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help_with_every_key(name, capsys, monkeypatch):
    module = importlib.import_module(COMMANDS[name][0])
    monkeypatch.setattr(module, "run", lambda overrides: pytest.fail("--help ran the command"))
    rc, out, err = run_cli([name, "--help"], capsys)
    assert rc == 0 and not err, err
    assert out.startswith(f"usage: rollout-plugin {name}") and COMMANDS[name][1] in out
    examples = out.split("\nexamples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) >= 2 and all("rollout-plugin " + name in e for e in examples), examples
    keys = sections(name)
    assert keys, f"{name}: no keys described"
    missing = [k.key for k in keys if not re.search(rf"^  {re.escape(k.key)}\s+{re.escape(k.type)}\s+= ", out, re.M)]
    assert not missing, f"{name} --help lacks {missing}"
    assert run_cli([name, "-h"], capsys)[1] == out
    assert run_cli(["help", name], capsys)[1] == out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_key_has_a_meaning(name):
    bare = [k.key for k in sections(name) if not k.doc and k.key not in BARE_OK]
    assert not bare, (f"{name}: keys with no comment in their schema dataclass (add a `# …` beside or above the "
                      f"field: --help shows it): {bare}")


def test_help_imports_no_engine_or_trainer():
    code = f"""
import importlib.abc, io, sys, contextlib
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from rollout_plugin.cli.main import COMMANDS, main
for name in COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([name, '--help']) == 0, name
assert main(['--version']) == 0
print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy: []" in proc.stdout


@pytest.mark.parametrize("name", [n for n in COMMANDS if spec(n).config or spec(n).cfg_yaml])
def test_every_help_example_composes(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name recipes/… relative to the repo
    for example in spec(name).examples:
        words = shlex.split(example)
        env = [w for w in words if re.match(r"^[A-Z_]+=", w)]
        args = words[len(env) + 1:]
        if args[0] != name:  # e.g. LAUNCH="rollout-plugin verl-check" bash recipe: checked in test_readme_commands
            continue
        rc, out, err = run_cli([*args, "--cfg", "job"], capsys)
        if name == "verl-check" and importlib.util.find_spec("verl") is None:
            assert rc == 2 and "pip install 'rollout-plugin[verl]'" in err, err
        else:
            assert rc == 0, f"{example}: {err}"
            assert yaml.safe_load(out)


def test_cfg_job_prints_the_composed_config(capsys):
    from omegaconf import OmegaConf

    from rollout_plugin.cli.app import compose_config
    from rollout_plugin.config.schema import CollectConfig

    rc, out, _ = run_cli(["collect", "pool.k=4", "verify=deferred", "--cfg", "job"], capsys)
    assert rc == 0
    printed = yaml.safe_load(out)
    assert printed["pool"]["k"] == 4 and printed["verify"]["timing"] == "deferred"
    composed = compose_config("collect", ["pool.k=4", "verify=deferred"], CollectConfig).cfg
    assert printed == OmegaConf.to_container(composed, enum_to_str=True)
    assert run_cli(["collect", "pool.k=4", "-c", "job", "-p", "pool.groups"], capsys)[1] == (
        "mode: auto\nsplit_threshold: 0.25\n")
    assert run_cli(["collect", "--cfg=job", "--package=pool.k", "pool.k=4"], capsys)[1] == "4\n"
    rc, out, _ = run_cli(["trl-grpo", "--recipe", str(ROOT / "recipes/trl/cpu_tiny.yaml"), "trl.max_steps=3",
                          "--cfg", "job", "-p", "trl"], capsys)
    assert rc == 0 and yaml.safe_load(out)["max_steps"] == 3 and yaml.safe_load(out)["num_generations"] == 8


def test_overrides_before_help_set_the_defaults_and_groups_shown(capsys):
    out = run_cli(["collect", "pool.k=4", "pool=ray", "--help"], capsys)[1]
    assert re.search(r"^  pool\.k\s+int\s+= 4$", out, re.M)
    assert re.search(r"^  pool\.ray\.address\s+str\|null\s+= auto$", out, re.M)  # from hydra_conf/pool/ray.yaml
    assert re.search(r"^  pool\s+default, ray\*$", out, re.M)
    plan = run_cli(["plan", "model=qwen3-8b", "--help"], capsys)[1]
    assert re.search(r"^  model\s+.*qwen3-8b\*", plan, re.M)


def test_info_says_where_the_config_comes_from(capsys):
    rc, out, _ = run_cli(["collect", "--info"], capsys)
    assert rc == 0
    assert "hydra_conf/collect.yaml" in out and "rollout_plugin.config.schema.CollectConfig" in out
    assert "main: pkg://rollout_plugin.hydra_conf" in out and re.search(r"^  engine\s+cpu_tiny\*, gpu$", out, re.M)
    assert run_cli(["collect", "--info", "searchpath"], capsys)[1].startswith("search path:")


@pytest.mark.parametrize("args,message", [
    (["collect", "--hlep"], "unknown flag '--hlep' (did you mean --help?); valid: --help/-h, --cfg/-c job|all"),
    (["trl-grpo", "--recipes", "x.yaml"], "valid: --help/-h, --cfg/-c job|all, --package/-p KEY, --resolve, "
                                          "--info/-i, --version, --recipe FILE"),
    (["collect", "pool.kk=1", "--cfg", "job"], "pool.kk='1': unknown config key (try pool.k=…)"),
    (["collect", "--cfg"], "--cfg needs a value (job|all)"),
    (["collect", "--cfg", "hydra"], "no hydra: run-time node; use --cfg job"),
    (["collect", "--cfg", "job", "-p", "pool.kk"], "--package pool.kk: no such key (try pool.k)"),
    (["plan", "model=qwen9", "--help"], "overrides given do not compose"),  # help still answers, and says so
])
def test_bad_flags_and_overrides_are_one_line(args, message, capsys):
    rc, out, err = run_cli(args, capsys)
    if "--help" in args:
        assert rc == 0 and message in out
        return
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_top_level_version_and_usage(capsys):
    from importlib.metadata import version

    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.startswith(f"rollout-plugin {version('rollout-plugin')}")
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0 and all(f"  {name:<10} " in out for name in COMMANDS) and "--help" in out
    rc, _, err = run_cli(["-x"], capsys)
    assert rc == 2 and "unknown flag '-x'" in err


def test_parse_flags_keeps_overrides_and_command_flags():
    recipe = {"--recipe": ("FILE", "a recipe")}
    flags, rest = parse_flags(["--recipe", "r.yaml", "a=1", "-c", "job", "--resolve", "b=--x"], recipe)
    assert flags.cfg == "job" and flags.resolve and rest == ["--recipe", "r.yaml", "a=1", "b=--x"]
    flags, rest = parse_flags(["--info", "defaults", "x=1"])
    assert flags.info == "defaults" and rest == ["x=1"]
    flags, rest = parse_flags(["--info", "x=1", "--recipe=r.yaml"], recipe)
    assert flags.info == "all" and rest == ["x=1", "--recipe=r.yaml"]
    assert not parse_flags(["a=1"])[0].any
    with pytest.raises(UsageError, match="--cfg job2: expected job or all"):
        parse_flags(["--cfg", "job2"])


# ---------------------------------------------------------------------------------------------- describe


class Color(str, enum.Enum):
    red = "red"  # warm
    blue = "blue"  # cold


@dataclass
class Inner:
    """Inner things.

    More words that are not the title.
    """

    depth: int = 3  # how deep


@dataclass
class Item:
    name: str = "x"  # its name


@dataclass
class Sample:
    # Above the field,
    # on two lines.
    plain: int = 1  # and beside it
    url: str = "http://a#b"  # the '#' in the string is no comment
    color: Color = Color.red
    maybe: Optional[float] = None

    bare: bool = False
    # One comment for two fields: lo_s is the floor, hi_s the ceiling.
    lo_s: float = 0.0
    hi_s: float = 1.0
    unnamed: int = 0
    inner: Inner = field(default_factory=lambda: Inner(depth=5))
    items: list[Item] = field(default_factory=list)  # any number


def test_describe_reads_comments_types_and_defaults_from_the_source():
    top, inner, items = describe(Sample)
    rows = {k.key: k for k in top.keys}
    assert list(rows) == ["plain", "url", "color", "maybe", "bare", "lo_s", "hi_s", "unnamed", "items"]
    assert rows["plain"].doc == "Above the field, on two lines. and beside it"
    assert (rows["url"].default, rows["url"].doc) == ("http://a#b", "the '#' in the string is no comment")
    assert (rows["color"].type, rows["color"].default, rows["color"].doc) == ("red|blue", "red",
                                                                             "red: warm; blue: cold")
    assert (rows["maybe"].type, rows["maybe"].default) == ("float|null", "null")
    assert (rows["bare"].doc, rows["bare"].default) == ("", "false")  # a blank line ends the comment above
    group = "One comment for two fields: lo_s is the floor, hi_s the ceiling."
    assert (rows["lo_s"].doc, rows["hi_s"].doc, rows["unnamed"].doc) == (group, group, "")  # it names hi_s
    assert (rows["items"].type, rows["items"].default) == ("list[Item]", "[]")
    assert (inner.prefix, inner.title, inner.keys[0].default) == ("inner", "Inner things.", "5")  # parent's factory
    assert (items.prefix, items.keys[0].key, items.keys[0].doc) == ("items[i]", "items[i].name", "its name")


def test_yaml_key_docs_reads_nested_keys_and_their_comments():
    text = ("# @package _global_\n# the command\nrollout_pool:\n  # GPU preset.\n  hardware: h100-80\n"
            "  router:\n    imbalance: 0.25  # beside\n    controller:\n      mode: adaptive\nother: [a, b]\n")
    assert yaml_key_docs(text) == {
        "rollout_pool.hardware": ("h100-80", "GPU preset."), "rollout_pool.router.imbalance": ("0.25", "beside"),
        "rollout_pool.router.controller.mode": ("adaptive", ""), "other": ("[a, b]", "")}
