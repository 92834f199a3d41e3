"""Every test process sees 8 simulated CPU devices (set before jax is imported)."""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs, in the test processes and in every `distgame`
# subprocess they start (which inherit this environment). LLVM's expensive passes buy nothing on models this
# size: without them a ci protocol run takes ~40% less CPU. Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the
# fully optimised build.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The CLI's compilation cache in a fresh directory per session, shared by the workers' `distgame` subprocesses:
# the suite pays what a fresh machine pays and never reads the user's ~/.cache/distgame. Every program is kept,
# however fast it compiled: many runs play the same ci config (a ci protocol run takes ~50 s cold, ~20 s with
# its programs cached). The controller imports this module before it spawns the workers, so they inherit it.
_OWN_CACHE = "DISTGAME_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["DISTGAME_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="distgame-test-jax-")
os.environ.setdefault("DISTGAME_COMPILATION_CACHE_MIN_S", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE:  # the process that made it: the controller, or a run without xdist
        shutil.rmtree(os.environ["DISTGAME_COMPILATION_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    from experiments.tasks.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def ci_models(tmp_path_factory, worker_id):
    """A run directory with the ci config's three models, trained once per test session (by whichever xdist
    worker asks first; the others wait on the lock) as a user trains them: `distgame train` in a process with one
    device. Tests write into a copy (`ci_run`)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id != "master" else base  # the session's directory, shared by its workers
    run_dir, complete = root / "ci_models", root / "ci_models.complete"  # the marker outside: copies are plain
    with open(root / "ci_models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
            for role in ("teacher", "proxy", "student"):
                result = subprocess.run(
                    [sys.executable, "-m", "experiments.cli", "train", "--role", role, "--config", "ci"]
                    + [f"run_dir={run_dir}", "--no-progress"],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=1800,
                )
                assert result.returncode == 0, result.stderr[-3000:]
            complete.touch()
    return run_dir


@pytest.fixture
def ci_run(ci_models, tmp_path):
    """A fresh run directory of the test's own holding a copy of the trained ci models."""
    return shutil.copytree(ci_models, tmp_path / "ci_run")


@pytest.fixture
def one_device_mesh():
    from models.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


# The suite runs as `pytest -n 2 --dist loadfile --no-loadscope-reorder` (Makefile): each file goes to one worker, in
# collection order, as a worker runs out of work. The files below hold the long subprocess runs (protocols, the
# equilibrium, two-process jax.distributed); started last they left one worker running alone for minutes. Longest
# first (rough seconds of one file under `-n 2` on the 2-core dev machine, summed from `pytest --durations=50`), the
# rest after them in their usual order: the short files fill in at the end.
SLOW_FILES_FIRST = (
    "test_pipeline.py",  # ~380 s
    "test_multihost.py",  # ~190 s
    "test_defense_registry.py",  # ~135 s
    "test_cross_tokenizer.py",  # ~100 s
    "test_attacker.py",  # ~80 s
    "test_world.py",  # ~70 s
    "test_hf_protocol.py",  # ~70 s
    "test_text_task.py",  # ~70 s
    "test_cli.py",  # ~65 s
    "test_reliability.py",  # ~60 s
    "test_paper_scale.py",  # ~60 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
