"""The core imports without torch or vllm (engines are reached over HTTP, maybe from another venv)."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'vllm', 'transformers', 'verl', 'trl', 'ray'}:
            raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import rollout_plugin, rollout_plugin.pool, rollout_plugin.config, rollout_plugin.collect, rollout_plugin.verify
import rollout_plugin.cli.main, rollout_plugin.cli.collect, rollout_plugin.model.embedded, rollout_plugin.tuning
import rollout_plugin.pool.engines.backends  # pool.backend=ray imports ray only when chosen
from rollout_plugin import RolloutPool, SyncRolloutPool, Request, Result
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'vllm', 'transformers'})
print('heavy:', heavy)
"""


def test_core_imports_without_torch_or_vllm():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout
