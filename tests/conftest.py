import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "movielens-100k"
EXAMPLES = REPO / "examples"


def pytest_configure(config):
    # One cache per test session (subprocesses inherit it): the user's real cache stays untouched,
    # and converted models are reused across the tests of one run.
    os.environ["FUNNELQA_CACHE_DIR"] = tempfile.mkdtemp(prefix="funnelqa-test-cache-")


@pytest.fixture
def shared_forward() -> Path:
    path = SHARED_DATA / "forward.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/movielens-100k/forward.jsonl is absent")
    return path


def funnelqa_executable() -> str:
    beside = Path(sys.executable).parent / "funnelqa"
    return str(beside) if beside.exists() else shutil.which("funnelqa") or "funnelqa"


def run_cli(*args: str, input: str | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Drive the real console script, as a user in a shell would."""
    return subprocess.run(
        [funnelqa_executable(), *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )
