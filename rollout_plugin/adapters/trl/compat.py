"""Which TRL versions the adapter supports, checked once before anything touches TRL's internals.

The generation backend stands in for ``GRPOTrainer.vllm_generation`` and the async worker for
``AsyncGRPOTrainer``'s protocols: both are read from TRL 1.16's source, so other versions are refused
with a clear message rather than failing deep inside a training step.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rollout_plugin.errors import TrainerAdapterError

SUPPORTED_TRL = (1, 16)  # major, minor: the 1.16.x series
INSTALL_HINT = 'pip install "trl>=1.16,<1.17"'


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def check_trl_version(version: str) -> None:
    """Raise :class:`TrainerAdapterError` unless ``version`` is in the supported series."""
    if _major_minor(version) != SUPPORTED_TRL:
        want = ".".join(map(str, SUPPORTED_TRL))
        raise TrainerAdapterError(f"trl=={version} is not supported by rollout_plugin.trl: it needs trl {want}.x, whose "
                          f"GRPOTrainer generation hooks it replaces; install it with {INSTALL_HINT}")


def require_trl() -> ModuleType:
    """Import TRL (lazily: ``import rollout_plugin`` never needs it) and check its version."""
    try:
        trl = importlib.import_module("trl")
    except ImportError as exc:
        raise TrainerAdapterError(f"rollout_plugin.trl needs TRL ({exc}); install it with {INSTALL_HINT}") from None
    check_trl_version(trl.__version__)
    return trl
