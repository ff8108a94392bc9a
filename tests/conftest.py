import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py, tests/engine_fixtures.py
pytest_plugins = ["engine_fixtures"]
