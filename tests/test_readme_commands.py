"""Every command the README, docs/ and recipes/ show is checked: the CPU ones run, the GPU/cluster ones at least parse.

Commands come from the fenced ```bash blocks of README.md and of every docs/*.md page, the Makefile's `demo`
line, the header lines of recipes/*.sh and recipes/verl/*.sh ("Run:", "Check first:") and the first line of
recipes/trl/*.yaml. Each is matched by the first RULE whose program and subcommand fit; a command no rule
matches fails test_every_documented_command_is_classified, so a new README or docs command must be classified
here. The README itself stays short: exactly the two set-up commands, under README_MAX_LINES lines, and a map
that links every docs/ page.

Actions (each rule states why it has the one it has):
- run:    run as written, in-process, in a scratch folder (recipes/ linked in);
- attach: run attached to the session engine (engine.urls/api_key), limit=2 and sampling.max_tokens=8 unless the
          command sets them; placeholder URLs, keys, model paths and files are filled in (PLACEHOLDERS below);
- serve:  start it attached, on a free port; the curl in the same block is run against it;
- parse:  compose the config (the CLI's own `--cfg job`) and run the command's validation, without running it;
- verl:   run through `rollout-plugin verl-check` in .venv-trainers (verl 0.9 cannot share this venv), all in
          one process (verl's import is most of the cost);
- syntax: `bash -n` on a script under scripts/ (installers, GPU drivers);
- skip:   with the stated reason.

Commands run in document order and share one scratch folder, as a reader following the README would: the
README first, then the docs/ pages in the order its map links them (docs/doctor.md's doctor line reads the
rollouts the README's collect lines wrote). A later line that writes an output an earlier one wrote gets
overwrite=true (documented lines are independent examples).
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER_PYTHON = ROOT / ".venv-trainers" / "bin" / "python"
VENV_BIN = Path(sys.executable).parent
PLACEHOLDER_OVERRIDES = "__YOUR_OVERRIDES__"
SMALL = {"limit": "2", "sampling.max_tokens": "8"}  # attach: unless the command sets them
SIM_MAX_ENGINES = 8  # simulate: fleets above this are cut to it (the README's 1,024 engines take minutes)
SERVE_START_S = 180
README_MAX_LINES = 250  # issue 20: a README a newcomer reads to the end; the rest lives in docs/
SETUP_COMMANDS = ["make demo", "make test"]  # the README's only set-up commands


# ---------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Command:
    source: str  # where it is documented: README.md:27, docs/verl.md:5, recipes/verl/x.sh:5
    text: str  # as documented (continuation lines joined, trailing comment dropped)
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # leading VAR=value assignments
    block: str = ""  # the fenced block it is in (serve and its curl share one)

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""

    @property
    def sub(self) -> str:
        return self.argv[1] if len(self.argv) > 1 else ""

    def opt(self, key: str) -> str | None:
        """The value of ``key=…`` (or ``+key=…``) among the arguments."""
        for arg in self.argv[1:]:
            name, eq, value = arg.lstrip("+~").partition("=")
            if eq and name == key:
                return value
        return None


def _command(source: str, text: str, block: str = "") -> Command:
    words = shlex.split(text.replace("<your overrides>", PLACEHOLDER_OVERRIDES), comments=True)
    env = []
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env.append((name, value))
    shown = text.split("  #")[0].strip()
    return Command(source, shown, tuple(words), tuple(env), block)


def fenced_commands(path: Path) -> list[Command]:
    """The commands in a Markdown file's fenced ```bash blocks, continuation lines joined, comments dropped."""
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text()
    out = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # a continued command
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if line.strip() and not line.strip().startswith("#"):
                out.append(_command(f"{rel}:{first + start}", line.strip(), block=f"{rel}:{first}"))
    return out


def readme_commands() -> list[Command]:
    return fenced_commands(ROOT / "README.md")


def docs_pages() -> list[Path]:
    """docs/*.md in the order the README's map links them (a reader's order), then any page it does not link."""
    linked = re.findall(r"\]\((docs/[\w.-]+\.md)[)#]", (ROOT / "README.md").read_text())
    pages = sorted(ROOT.glob("docs/*.md"))
    order = {p: i for i, p in enumerate(dict.fromkeys(ROOT / rel for rel in linked))}
    return sorted(pages, key=lambda p: (order.get(p, len(order)), p.name))


def docs_commands() -> list[Command]:
    return [cmd for page in docs_pages() for cmd in fenced_commands(page)]


def _header_command(line: str) -> str | None:
    """The command in a recipe's header comment, optional ``[…]`` parts and ``(…)`` remarks dropped."""
    body = re.sub(r"^#\s*(Run:|Check first:)?\s*", "", line)
    if not re.match(r"^([A-Z_]+=\"[^\"]*\"\s+)?(bash|rollout-plugin|python)\s", body):
        return None
    body = re.split(r"\s{2,}\(", body)[0]
    return re.sub(r"\s*\[[^\]]*\]", "", body).strip()


def recipe_commands() -> list[Command]:
    out = []
    for path in sorted([*ROOT.glob("recipes/*.sh"), *ROOT.glob("recipes/*/*.sh"), *ROOT.glob("recipes/*/*.yaml")]):
        rel = path.relative_to(ROOT)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                break  # the header is the leading comment block
            found = _header_command(line)
            if found:
                out.append(_command(f"{rel}:{n}", found))
    return out


def makefile_commands() -> list[Command]:
    """`make demo`'s own command line, so the demo is checked without installing anything."""
    text = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M)
    lines = demo.group(1).splitlines() if demo else []
    return [_command(f"Makefile:demo", re.sub(r"^\$\(BIN\)/", "", line.strip())) for line in lines
            if "rollout-plugin" in line]


def documented() -> list[Command]:
    seen: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], Command] = {}
    for cmd in [*readme_commands(), *docs_commands(), *makefile_commands(), *recipe_commands()]:
        seen.setdefault((cmd.argv, cmd.env), cmd)  # the same line in two places is checked once
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    name: str
    matches: Callable[[Command], bool]
    action: str  # run | attach | serve | curl | parse | verl | syntax | skip
    why: str


def _rp(sub: str) -> Callable[[Command], bool]:
    return lambda c: c.program == "rollout-plugin" and c.sub == sub


def _on_cluster(c: Command) -> bool:
    return (c.opt("pool") == "ray" or c.opt("pool.backend") == "ray" or c.opt("engine") == "gpu")


def _gpu_recipe(c: Command) -> bool:
    recipe = next((c.argv[i + 1] for i, a in enumerate(c.argv[:-1]) if a == "--recipe"), c.opt("recipe"))
    return bool(recipe) and re.search(r"override engine:\s*gpu", (ROOT / recipe).read_text()) is not None


def _hydra_flag(c: Command) -> bool:
    return c.program == "rollout-plugin" and any(a in ("--help", "-h", "--cfg", "--info", "--version")
                                                 for a in c.argv[1:])


RULES = [
    Rule("make", lambda c: c.program == "make", "skip",
         "installs the venvs, then runs the demo or the whole suite (minutes); the demo's collect line is taken "
         "from the Makefile and run here"),
    Rule("pip install", lambda c: c.program in ("pip", "pip3") and c.sub == "install", "skip",
         "installs packages: the suite already runs in an installed venv, with no index to reach"),
    Rule("venv", lambda c: c.program.startswith("python") and c.argv[1:3] == ("-m", "venv"), "skip",
         "creates a venv and installs into it (docs/gpu.md's two environments): the suite already runs in an "
         "installed venv, with no index to reach; scripts/trainer_venv.sh builds the trainers' one"),
    Rule("flags", _hydra_flag, "run", "--help/--cfg/--info/--version answer at once"),
    Rule("verl trainer", lambda c: c.program.startswith("python") and c.argv[1:3] == ("-m", "verl.trainer.main_ppo"),
         "verl", "a GPU job: its overrides go through `rollout-plugin verl-check`, as the README advises"),
    Rule("verl-check", _rp("verl-check"), "verl", "needs verl, which lives in .venv-trainers"),
    Rule("verl recipe", lambda c: c.program == "bash" and c.sub.startswith("recipes/verl/"), "verl",
         "a GPU job: checked through its LAUNCH hook with verl-check, as its header says"),
    Rule("setup script", lambda c: c.program == "bash" and c.sub.startswith("scripts/"), "syntax",
         "scripts/ build venvs or drive GPU boxes: checked with `bash -n` (their behaviour has its own tests)"),
    Rule("shell recipe", lambda c: c.program == "bash" and c.sub.startswith("recipes/") and c.sub.endswith(".sh"),
         "attach", "a collect job: run attached to the session engine, small"),
    Rule("collect on a cluster", lambda c: _rp("collect")(c) and _on_cluster(c), "parse",
         "needs a Ray cluster or GPUs: composed and validated (tests/test_ray_backend.py runs Ray for real)"),
    Rule("collect", _rp("collect"), "attach", "runs on the session engine, small"),
    Rule("verify", _rp("verify"), "run", "CPU only: scores what collect wrote"),
    Rule("serve", _rp("serve"), "serve", "attached to the session engine on a free port, for the curl after it"),
    Rule("curl", lambda c: c.program == "curl", "curl", "against the gateway the same block started"),
    Rule("doctor", _rp("doctor"), "run", "reads the run the collect lines wrote; live URLs: the session engine"),
    Rule("trl-grpo on GPUs", lambda c: _rp("trl-grpo")(c) and _gpu_recipe(c), "parse",
         "needs 2 GPUs: the recipe is composed and its trl: keys checked against GRPOConfig"),
    Rule("trl-grpo", _rp("trl-grpo"), "parse",
         "trains for minutes and reloads the shared engine's weights; composed and checked against GRPOConfig here, "
         "and the CPU recipe trains 3 steps through the pool in tests/test_trl_routes.py"),
    Rule("simulate", _rp("simulate"), "run", f"CPU only; fleets cut to {SIM_MAX_ENGINES} engines, 4 prompts each"),
    Rule("plan", _rp("plan"), "run", "pure planning, no GPU"),
    Rule("plot", _rp("plot"), "run", "draws a timeline collect wrote"),
    Rule("model", _rp("model"), "run", "builds (or finds) the embedded model"),
]

ENGINE_ACTIONS = ("attach", "serve", "curl")


def classify(cmd: Command) -> Rule | None:
    return next((rule for rule in RULES if rule.matches(cmd)), None)


COMMANDS = documented()


def test_every_documented_command_is_classified():
    assert readme_commands() and docs_commands() and makefile_commands()
    found = {c.source.split(":")[0] for c in recipe_commands()}
    for recipe in [*ROOT.glob("recipes/*.sh"), *ROOT.glob("recipes/*/*.sh"), *ROOT.glob("recipes/*/*.yaml")]:
        assert str(recipe.relative_to(ROOT)) in found, f"{recipe}: no command found in its header"
    unclassified = [f"{c.source}: {c.text}" for c in COMMANDS if classify(c) is None]
    assert not unclassified, ("documented commands no rule in tests/test_readme_commands.py matches (add one, "
                              "keyed on the program and subcommand):\n" + "\n".join(unclassified))


def test_rules_are_general_and_each_is_used():
    """A rule keyed on exact README text would break on the next edit; every rule still matches something."""
    probes = [_command("probe", t) for t in (
        "rollout-plugin collect pool.k=3", "rollout-plugin collect pool=ray", "rollout-plugin serve port=1",
        "rollout-plugin simulate", "rollout-plugin plan model=qwen2.5-7b", "rollout-plugin verify input=x.jsonl",
        "rollout-plugin doctor run=x.jsonl", "rollout-plugin collect --help", "make demo", "pip install x",
        "python -m verl.trainer.main_ppo a=1", "bash recipes/collect_grpo.sh", "curl http://127.0.0.1:1/v1/models",
        "bash scripts/trainer_venv.sh", "python3 -m venv .venv && .venv/bin/pip install -e .[verl]")]
    assert all(classify(p) is not None for p in probes)
    assert classify(_command("probe", "rollout-plugin no-such-command")) is None
    assert classify(_command("probe", "docker run x")) is None


SETUP_RULES = ("make", "pip install", "venv")  # the rules that install or build environments


def test_readme_has_exactly_the_two_setup_commands():
    """Everything a newcomer installs goes through `make demo` / `make test`; other installs live in docs/."""
    setup = [c.text for c in readme_commands() if (r := classify(c)) is not None and r.name in SETUP_RULES]
    assert setup == SETUP_COMMANDS


def test_readme_is_short_and_maps_every_docs_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into a docs/ page"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)[)#]", "\n".join(lines)))
    unlinked = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md")
                if p.relative_to(ROOT).as_posix() not in linked]
    assert not unlinked, f"docs pages missing from the README's map: {unlinked}"
    missing = [rel for rel in linked if not (ROOT / rel).exists()]
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    broken = [f"{page.name} -> {target}" for page in ROOT.glob("docs/*.md")
              for target in re.findall(r"\]\(([\w.-]+\.(?:md|png))[)#]", page.read_text())
              if not (page.parent / target).exists()]
    assert not broken, f"docs pages link pages or images that do not exist: {broken}"


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass
class Workspace:
    root: Path
    engine: object = None  # LiveEngine, when a case needed it
    model_dir: str = ""
    served: dict[str, str] = field(default_factory=dict)  # fenced block -> gateway URL
    procs: list[subprocess.Popen] = field(default_factory=list)
    verl: dict[str, tuple[int, str]] | None = None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("readme")
    (root / "recipes").symlink_to(ROOT / "recipes")  # commands name recipes/… relative to the repo
    # PLACEHOLDERS: the input file a reader brings (README: {"id", "prompt"} lines, other fields to the verifier).
    (root / "my.jsonl").write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)})
                                           + "\n" for i in range(3)))
    ws = Workspace(root, model_dir=model_dir)
    try:
        yield ws
    finally:
        for proc in ws.procs:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------- rewrites


def _fill(arg: str, ws: Workspace) -> list[str]:
    """PLACEHOLDERS: example hosts -> the session engine, $KEY -> its key, a model path that isn't here -> ours."""
    if arg == PLACEHOLDER_OVERRIDES:  # verl: the smallest GRPO job that validates offline
        return [f"actor_rollout_ref.model.path={ws.model_dir}", "algorithm.adv_estimator=grpo",
                "actor_rollout_ref.rollout.n=8"]
    if ws.engine is not None:
        url = ws.engine.url  # type: ignore[attr-defined]
        arg = re.sub(r"https?://(?!127\.0\.0\.1|localhost)[\w.-]+:\d+", url, arg)
        arg = arg.replace("$KEY", ws.engine.api_key)  # type: ignore[attr-defined]
    key, eq, value = arg.partition("=")
    if eq and key.endswith("model") and value.startswith("/") and not Path(value).exists():
        return [f"{key}={ws.model_dir}"]
    return [arg]


def _filled(cmd: Command, ws: Workspace) -> list[str]:
    return [a for arg in cmd.argv[1:] for a in _fill(arg, ws)]


def _attached(cmd: Command, args: list[str], ws: Workspace, *, small: bool = True) -> list[str]:
    given = {a.lstrip("+~").split("=", 1)[0] for a in args if "=" in a}
    engines = min(int(cmd.opt("pool.engines") or 1), 4)
    extra = []
    if "engine.urls" not in given:  # one URL per engine the command asks for: all the session engine
        extra.append("engine.urls=[" + ",".join([ws.engine.url] * engines) + "]")  # type: ignore[attr-defined]
    if "engine.api_key" not in given:
        extra.append(f"engine.api_key={ws.engine.api_key}")  # type: ignore[attr-defined]
    if small:
        extra += [f"{k}={v}" for k, v in SMALL.items() if k not in given]
    output = cmd.opt("output") or "rollouts.jsonl"
    if cmd.sub == "collect" and (ws.root / output).exists() and "resume" not in given and "overwrite" not in given:
        extra.append("overwrite=true")  # an earlier example wrote it
    return args + extra


def _simulate_small(args: list[str]) -> list[str]:
    out, given = [], set()
    for arg in args:
        key, _, value = arg.partition("=")
        given.add(key)
        if key == "fleet.engines":
            sizes = sorted({min(int(n), SIM_MAX_ENGINES) for n in value.strip("[]").split(",")})
            arg = f"fleet.engines=[{','.join(map(str, sizes))}]"
        out.append(arg)
    if "fleet.engines" not in given:
        out.append(f"fleet.engines=[{SIM_MAX_ENGINES}]")
    if "workload.prompts_per_engine" not in given:
        out.append("workload.prompts_per_engine=4")
    return out


# ---------------------------------------------------------------------------------------------- actions


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from rollout_plugin.cli.main import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, (captured.out + captured.err)[-4000:]


def _subprocess(cmd: Command, args: list[str], ws: Workspace, timeout: float = 300) -> tuple[int, str]:
    env = {**os.environ, **dict(cmd.env), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([cmd.argv[0], *args], cwd=ws.root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def _parse(cmd: Command, args: list[str], capsys) -> tuple[int, str]:
    """The CLI composes it (--cfg job), then the command's own validation runs on the typed config."""
    rc, out = _cli([cmd.sub, *args, "--cfg", "job"], capsys)
    if rc == 0:
        PARSERS.get(cmd.sub, lambda _: None)(args)
    return rc, out


def _check_collect(args: list[str]) -> None:
    from rollout_plugin.cli.app import compose
    from rollout_plugin.config.schema import CollectConfig
    from rollout_plugin.config.validate import validate_collect

    validate_collect(compose("collect", args, CollectConfig))


def _check_trl(args: list[str]) -> None:
    import dataclasses

    from trl import GRPOConfig

    from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
    from rollout_plugin.adapters.trl.entry import grpo_kwargs
    from rollout_plugin.cli.app import compose
    from rollout_plugin.cli.trl_grpo import _recipe

    register_trl_configs()
    cfg = compose("trl_grpo", _recipe(args), TrlGrpoConfig)
    grpo_kwargs(cfg, {f.name: f.default for f in dataclasses.fields(GRPOConfig)}, None)  # unknown keys raise


PARSERS: dict[str, Callable[[list[str]], None]] = {"collect": _check_collect, "trl-grpo": _check_trl}

VERL_DRIVER = r"""
import contextlib, io, json, os, subprocess, sys
from rollout_plugin.cli.main import main
out = {}
for key, job in json.loads(sys.argv[1]).items():
    args = job["args"]
    if job["script"]:  # a recipe: its LAUNCH hook prints the overrides it would give verl
        p = subprocess.run(["bash", job["script"], *args], env={**os.environ, **job["env"], "LAUNCH": "printf %s\\n"},
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            out[key] = [p.returncode, p.stderr[-3000:]]
            continue
        args = [line for line in p.stdout.splitlines() if line]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(["verl-check", *args])
    out[key] = [rc, buf.getvalue()[-3000:]]
print("@@RESULTS@@" + json.dumps(out))
"""


def _verl_job(cmd: Command, ws: Workspace) -> tuple[str, dict]:
    args = _filled(cmd, ws)
    if cmd.program == "bash":
        job = {"script": cmd.sub, "args": args[1:], "env": {k: v for k, v in cmd.env if k != "LAUNCH"}}
    else:
        start = 2 if cmd.program == "rollout-plugin" else 3  # rollout-plugin verl-check … / python -m verl… …
        job = {"script": None, "args": [a for arg in cmd.argv[start:] for a in _fill(arg, ws)], "env": {}}
    return json.dumps(job, sort_keys=True), job


def _verl_results(ws: Workspace) -> dict[str, tuple[int, str]]:
    """Every verl command, checked in one trainer-venv process (importing verl is most of each check)."""
    if ws.verl is None:
        jobs = dict(_verl_job(c, ws) for c in COMMANDS if (r := classify(c)) is not None and r.action == "verl")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no hub here: fail fast instead of retrying
        proc = subprocess.run([str(TRAINER_PYTHON), "-c", VERL_DRIVER, json.dumps(jobs)], cwd=ws.root, env=env,
                              capture_output=True, text=True, timeout=600)
        marker = proc.stdout.rfind("@@RESULTS@@")
        assert proc.returncode == 0 and marker >= 0, (proc.stdout + proc.stderr)[-3000:]
        ws.verl = {k: (rc, text) for k, (rc, text) in json.loads(proc.stdout[marker + len("@@RESULTS@@"):]).items()}
    return ws.verl


def _serve(cmd: Command, ws: Workspace) -> tuple[int, str]:
    args = [("port=0" if a.startswith("port=") else a) for a in _attached(cmd, _filled(cmd, ws), ws, small=False)]
    if not any(a.startswith("port=") for a in args):
        args.append("port=0")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([cmd.argv[0], *args], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ws.procs.append(proc)
    fd, seen, deadline = proc.stdout.fileno(), b"", time.monotonic() + SERVE_START_S  # type: ignore[union-attr]
    # Raw reads on the fd: a buffered readline() after select() can leave the announcement in Python's buffer
    # (the log line and it arrive in one read), where select() never sees it again.
    while time.monotonic() < deadline:  # its "serving <url>/v1" line says it accepts requests
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk and proc.poll() is not None:
            break
        seen += chunk
        found = re.search(rb"rollout-plugin serve: (http://\S+)/v1", seen)
        if found:
            ws.served[cmd.block] = found.group(1).decode()
            # keep draining its output, or a full pipe would stall the gateway's logging mid-request
            threading.Thread(target=lambda: all(iter(lambda: os.read(fd, 65536), b"")), daemon=True).start()
            return 0, seen.decode(errors="replace")[-3000:]
    _stop(proc)
    return 1, f"serve did not come up: {seen.decode(errors='replace')[-3000:]}"


def _curl(cmd: Command, ws: Workspace) -> tuple[int, str]:
    url = ws.served.get(cmd.block)
    assert url, f"no gateway was started in the block at {cmd.block} for this curl"
    args = [re.sub(r"http://(127\.0\.0\.1|localhost):\d+", url, a) for a in cmd.argv[1:]]
    proc = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        return proc.returncode, proc.stderr
    try:
        body = json.loads(proc.stdout)
    except ValueError:
        return 1, f"not JSON: {proc.stdout[:2000]}"
    ok = isinstance(body, dict) and "error" not in body and bool(body.get("choices") or body.get("data"))
    return (0 if ok else 1), proc.stdout[:2000]


def _needs_engine(c: Command) -> bool:
    """Runs on the session engine, or reads what a collect line wrote on it (doctor's run, verify's input)."""
    return (r := classify(c)) is not None and (r.action in ENGINE_ACTIONS or c.sub in ("doctor", "verify"))


@pytest.mark.parametrize("cmd", [pytest.param(c, id=f"{c.source} {c.program} {c.sub}".strip(),
                                              marks=[pytest.mark.engine] if _needs_engine(c) else [])
                                 for c in COMMANDS])
def test_documented_command(cmd: Command, workspace: Workspace, request, capsys, monkeypatch):
    rule = classify(cmd)
    assert rule is not None, f"{cmd.source}: no rule for {cmd.text!r} (see test_every_documented_command_is_classified)"
    if rule.action == "skip":
        pytest.skip(f"{rule.name}: {rule.why}")
    if rule.action == "verl" and not TRAINER_PYTHON.exists():
        pytest.skip("no .venv-trainers (make test builds it: bash scripts/trainer_venv.sh)")
    rc, out = check(cmd, rule, workspace, request, capsys, monkeypatch)
    assert rc == 0, f"{cmd.source}: {cmd.text}\n{out}"


@pytest.mark.parametrize("text", [
    "rollout-plugin plan model=qwen2.5-7b workload.nn=8",  # run: a misspelt key
    "rollout-plugin collect pool=ray pool.ray.nodes=[CPU]",  # parse: composes, fails validation
    "rollout-plugin trl-grpo --recipe recipes/trl/cpu_tiny.yaml trl.max_stepz=3",  # parse: not a GRPOConfig field
])
def test_a_broken_command_fails(text, workspace, request, capsys, monkeypatch):
    cmd = _command("probe", text)
    rule = classify(cmd)
    assert rule is not None and rule.action in ("run", "parse")
    try:
        rc, _ = check(cmd, rule, workspace, request, capsys, monkeypatch)
    except Exception:  # a validator raising is a failure too
        rc = 1
    assert rc != 0


def check(cmd: Command, rule: Rule, workspace: Workspace, request, capsys, monkeypatch) -> tuple[int, str]:
    """Run (or compose, or verl-check) one documented command as its rule says; its exit code and output."""
    monkeypatch.chdir(workspace.root)
    if rule.action in ENGINE_ACTIONS or any("http" in a and "127.0.0.1" not in a for a in cmd.argv):
        workspace.engine = request.getfixturevalue("live_engine")
    args = _filled(cmd, workspace)  # the arguments after the program: [subcommand, key=value, …]
    if rule.action == "verl":
        return _verl_results(workspace)[_verl_job(cmd, workspace)[0]]
    if rule.action == "parse":
        return _parse(cmd, args[1:], capsys)
    if rule.action == "syntax":
        proc = subprocess.run(["bash", "-n", cmd.sub], cwd=ROOT, capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stderr
    if rule.action == "serve":
        return _serve(cmd, workspace)
    if rule.action == "curl":
        return _curl(cmd, workspace)
    if rule.action == "attach" and cmd.program == "bash":
        return _subprocess(cmd, _attached(cmd, args, workspace), workspace)
    if rule.action == "attach":
        return _cli([cmd.sub, *_attached(cmd, args[1:], workspace)], capsys)
    if cmd.sub == "simulate":
        return _cli([cmd.sub, *_simulate_small(args[1:])], capsys)
    return _cli(args, capsys)
