"""The one place the tuning package reads a file: an HF ``config.json`` into a :class:`ModelSpec`.

Kept apart from :mod:`rollout_plugin.tuning.spec` so the planner and its inputs stay pure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.tuning.spec import ModelSpec, model_from_hf_config


def load_hf_config(path: str, *, dtype: Optional[str] = None) -> ModelSpec:
    """Read ``<dir>/config.json`` (or a ``config.json`` path) into a :class:`ModelSpec`."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(ConfigProblem("model.path", path, "no config.json there (give an HF model directory "
                                        "or its config.json)", "model=qwen2.5-7b"))
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(ConfigProblem("model.path", path, f"unreadable config.json: {exc}")) from None
    return model_from_hf_config(config, name=file.parent.name or str(file), path=str(file.parent), dtype=dtype)
