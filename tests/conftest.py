import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py, tests/engine_fixtures.py
pytest_plugins = ["engine_fixtures"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fake_engine_contract():
    """Any test whose fake engines saw a call break the client contract fails (tests/chaos.py)."""
    from chaos import VIOLATIONS

    VIOLATIONS.clear()
    yield
    assert not VIOLATIONS, VIOLATIONS[:3]
