"""Every test process sees 8 simulated CPU devices (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from experiments.tasks.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def one_device_mesh():
    from models.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
