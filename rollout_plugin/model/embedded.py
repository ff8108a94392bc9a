"""The embedded default model: a tiny random Llama built on first use and cached on disk.

``model=embedded:tiny-llama`` lets the whole pipeline run without a hub download. The build runs
``build_tiny.py`` (next to this file) under the engine's interpreter, since that is where torch,
transformers and tokenizers live; this module itself is stdlib only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from rollout_plugin.config.schema import EMBEDDED_MODEL
from rollout_plugin.errors import EngineError

log = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).with_name("build_tiny.py")
MODEL_NAME = "tiny-llama-v1"  # bump the version when build_tiny.py changes what it writes

__all__ = ["EMBEDDED_MODEL", "cache_dir", "embedded_model_dir", "ensure_embedded_model", "resolve_model"]


def cache_dir() -> Path:
    """``$ROLLOUT_PLUGIN_CACHE``, else ``~/.cache/rollout_plugin``."""
    env = os.environ.get("ROLLOUT_PLUGIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rollout_plugin"


def embedded_model_dir(seed: int = 0) -> Path:
    return cache_dir() / "models" / f"{MODEL_NAME}-seed{seed}"


def ensure_embedded_model(python: str | None = None, seed: int = 0, timeout_s: float = 600) -> Path:
    """The embedded model's directory, built first (with ``python``) when it is not there yet."""
    out = embedded_model_dir(seed)
    if (out / "config.json").is_file():
        return out
    python = python or sys.executable
    log.info("building the embedded model %s into %s (with %s)", EMBEDDED_MODEL, out, python)
    cmd = [python, str(BUILD_SCRIPT), "--out", str(out), "--seed", str(seed)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except FileNotFoundError as e:
        raise EngineError(f"cannot build the embedded model: interpreter {python!r} not found") from e
    except subprocess.TimeoutExpired as e:
        raise EngineError(
            f"building the embedded model with {python} took over {timeout_s:g}s; "
            f"stderr tail: {_tail(e.stderr)}"
        ) from e
    if proc.returncode != 0 or not (out / "config.json").is_file():
        raise EngineError(
            f"building the embedded model with {python} failed (exit {proc.returncode}); it needs "
            f"torch, transformers and tokenizers in that interpreter; stderr tail: {_tail(proc.stderr)}"
        )
    return out


def resolve_model(model: str, python: str | None = None) -> str:
    """A model string an engine can load: the embedded model's directory, or ``model`` as given."""
    if model == EMBEDDED_MODEL:
        return str(ensure_embedded_model(python))
    return model


def _tail(text: str | bytes | None, lines: int = 8) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(empty)"
