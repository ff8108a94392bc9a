"""``rollout-plugin <command> key=value …``: parse, call, print; no business logic here."""

from __future__ import annotations

import importlib
import logging
import signal
import sys

from rollout_plugin.cli.help import answer, parse_flags, version_text
from rollout_plugin.errors import RolloutPluginError

# command -> (module, one-line help); each module exposes run(overrides: list[str]) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("rollout_plugin.cli.collect", "generate rollouts for a JSONL of prompts and score them"),
    "model": ("rollout_plugin.cli.model", "build (if missing) and print the embedded tiny model's directory"),
    "plan": ("rollout_plugin.cli.plan", "plan vLLM, pool, verl and TRL settings for a model, hardware and workload"),
    "plot": ("rollout_plugin.cli.plot", "draw a pool run's timeline (JSONL) as a PNG: caps, KV, tokens/s, health"),
    "trl-grpo": ("rollout_plugin.cli.trl_grpo", "train with TRL's GRPOTrainer, generating with the pool (recipes/trl/)"),
    "verl-check": ("rollout_plugin.cli.verl_check", "check a verl command line: verl's and our validation, no GPU"),
    "simulate": ("rollout_plugin.cli.simulate", "simulate a fleet of engines: makespan and tokens/s per policy"),
    "serve": ("rollout_plugin.cli.serve", "serve the pool as one OpenAI-compatible endpoint (TRL, NeMo Gym, curl)"),
    "verify": ("rollout_plugin.cli.verify", "score rollouts written by `collect verify=deferred` (resumable)"),
    "doctor": ("rollout_plugin.cli.doctor", "read a run's summary and timeline and say what to change"),
}

log = logging.getLogger(__name__)


def _usage() -> str:
    lines = ["usage: rollout-plugin <command> [key=value ...] [--help | --cfg job | --info]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "rollout-plugin <command> --help: what it does, its config groups and every key (type, default, "
              "meaning)", "rollout-plugin --version: the package version"]
    return "\n".join(lines)


def _sigterm_to_exit(signum: int, frame: object) -> None:
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C so every engine is stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:
        argv = [argv[1], "--help", *argv[2:]]  # `rollout-plugin help collect`
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(version_text())
        return 0
    name, args = argv[0], argv[1:]
    if name.startswith("-"):
        print(f"rollout-plugin: unknown flag {name!r}; valid here: --help/-h, --version; "
              f"or a command first: rollout-plugin <command> --help", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"rollout-plugin: unknown command {name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    module = importlib.import_module(COMMANDS[name][0])
    spec = getattr(module, "HELP", None)
    try:
        flags, overrides = parse_flags(args, spec.flags if spec else {})
        if flags.any:  # --help, --cfg, --info, --version: answer and exit; the command does not run
            sys.stdout.write(answer(name, COMMANDS[name][1], spec, flags, overrides))
            return 0
        return int(module.run(overrides) or 0)
    except RolloutPluginError as exc:
        print(f"rollout-plugin {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # cli.aio.Interrupted carries the signal's exit status (130, 143)
        print(f"rollout-plugin {name}: interrupted; engines stopped", file=sys.stderr)
        return getattr(exc, "code", 130)


if __name__ == "__main__":
    sys.exit(main())
