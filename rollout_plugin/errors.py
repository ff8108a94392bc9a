"""The project's exception tree, in one place.

Every error a user can cause carries enough to fix it without a traceback: the CLI prints
``str(error)`` on one line and exits non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass


class RolloutPluginError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: the dotted key, its value, why, and what would be valid."""

    key: str
    value: object
    reason: str
    suggestion: str | None = None

    def __str__(self) -> str:
        text = f"{self.key}={self.value!r}: {self.reason}"
        return f"{text} (try {self.suggestion})" if self.suggestion else text


class ConfigError(RolloutPluginError):
    """One or more config problems, reported together."""

    def __init__(self, problems: list[ConfigProblem] | ConfigProblem):
        self.problems = [problems] if isinstance(problems, ConfigProblem) else list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class InputError(RolloutPluginError):
    """Bad input data: a missing file, a malformed JSONL line, an output that already exists."""


class EngineError(RolloutPluginError):
    """An engine could not be launched, attached or kept alive."""


class EngineStartError(EngineError):
    """An engine process exited or did not become healthy in time; carries its log's tail."""

    def __init__(self, message: str, log_tail: str = ""):
        self.log_tail = log_tail
        tail = " | ".join(line.strip() for line in log_tail.strip().splitlines()[-8:] if line.strip())
        super().__init__(f"{message}; log tail: {tail}" if tail else message)


class PoolError(RolloutPluginError):
    """The pool cannot go on (every engine is dead, or it was used after close)."""


class VerifierError(RolloutPluginError):
    """A verifier could not be loaded (bad dotted path)."""


class SimulationError(RolloutPluginError):
    """The fleet simulator cannot go on (a deadlock in simulated time, a missing or malformed profile)."""


class TrainerAdapterError(RolloutPluginError):
    """A trainer adapter cannot serve this trainer: an unsupported trainer version or setting, a failed rollout."""
