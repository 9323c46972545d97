"""The tests' fixtures and pytest hooks, and the environment every test runs in. What tests share besides
fixtures (configs, the CLI in a subprocess, readers of a run's files) is in helpers.py."""

import os
from pathlib import Path

import pytest

# Every Ray process the tests start (in this process or in the CLI's) binds to loopback and sends no
# usage statistics.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tests run two at a time (pytest-xdist): each worker keeps its own cache of the data sets the project
# writes (digit canvases, QA facts), so two never write the same files at once; and its own Ray temp dir, so
# that Ray's processes that look for "the" cluster of this machine (its ray_current_cluster file) find their
# own test's cluster, not the other worker's.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["XDG_CACHE_HOME"] = f"/tmp/trainer-test-cache-{worker}"
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{worker}"


@pytest.fixture(autouse=True)
def restore_logging():
    """A test that runs `train()` in this process sets up the run's console and train.log on the root
    logger (trainer/reporting/console.py); the next test starts from pytest's own."""
    import logging
    import warnings

    root = logging.getLogger()
    handlers, level, showwarning = root.handlers[:], root.level, warnings.showwarning
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.showwarning = showwarning


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


# The files that take longest, longest first (--durations=0 of the whole suite on 2 cores): the xdist workers
# take them before the short ones, so that no long file starts last and runs alone at the end.
SLOWEST_FILES = [
    "test_sweeps.py",
    "test_fsdp.py",
    "test_slurm.py",
    "test_ray.py",  # after two other files that start Ray clusters, so that three do not start at once
    "test_sync.py",
    "test_detection.py",
    "test_guard_zoo.py",
    "test_divergence.py",
    "test_bad_input.py",
    "test_install.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
