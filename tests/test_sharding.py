"""Meshes on 8 simulated CPU devices: parameter shardings follow the rule table, and a
sharded train step computes the same loss as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.config import ConfigError, load_config
from experiments.train import Trainer, make_mesh
from models.sharding import MeshConfig

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]

# Written out by hand from DEFAULT_RULES (vocab->tensor, embed->fsdp, heads/kv_heads/mlp->tensor).
EXPECTED = {
    "embed_vd": P("tensor", "fsdp"),
    "wq_dnh": P("fsdp", "tensor", None),
    "wk_dkh": P("fsdp", "tensor", None),
    "wv_dkh": P("fsdp", "tensor", None),
    "wo_nhd": P("tensor", None, "fsdp"),
    "w_gate_df": P("fsdp", "tensor"),
    "w_up_df": P("fsdp", "tensor"),
    "w_down_fd": P("tensor", "fsdp"),
    "scale_d": P(None),
}


def _cfg(mesh, **extra):
    data, fsdp, tensor = mesh
    overrides = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", "run_dir=/tmp/unused"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config("ci", overrides)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 50, (16, 24)).astype(np.int32)
    mask = (rng.random((16, 24)) < 0.7).astype(np.float32)
    return {"tokens_bt": tokens, "loss_mask_bt": mask}


def _two_losses(trainer):
    from models.sharding import shard_batch

    losses = []
    for seed in (0, 1):
        trainer.state, metrics = trainer.step_fn(trainer.state, shard_batch(_batch(seed), trainer.mesh))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def reference_losses():
    cfg = _cfg((1, 1, 1))
    mesh = make_mesh(cfg, jax.devices()[:1])
    return _two_losses(Trainer(cfg, "teacher", mesh))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_param_shardings_follow_rule_table(shape):
    cfg = _cfg(shape)
    mesh = make_mesh(cfg)
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
    trainer = Trainer(cfg, "teacher", mesh)
    flat = jax.tree_util.tree_flatten_with_path(trainer.state["params"])[0]
    assert len(flat) > 10
    for path, leaf in flat:
        name = path[-1].key
        spec = EXPECTED[name]
        assert leaf.sharding.spec == spec, (name, leaf.sharding.spec)
        # Each device holds exactly its block of the global array.
        want = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim))
        assert leaf.addressable_shards[0].data.shape == want, name
    # Optimizer moments live on the same shards as their parameters.
    mu = trainer.state["opt_state"][1][0].mu
    assert mu["embed_vd"].sharding.spec == EXPECTED["embed_vd"]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_train_step_matches_one_device(shape, reference_losses):
    cfg = _cfg(shape)
    losses = _two_losses(Trainer(cfg, "teacher", make_mesh(cfg)))
    np.testing.assert_allclose(losses, reference_losses, atol=1e-5, rtol=0)
    assert losses[1] != losses[0]  # the first step really updated the parameters


def test_mesh_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="3\\*1\\*1 = 3 but there are 8 devices"):
        MeshConfig(3, 1, 1).shape(8)
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(_cfg((2, 2, 1)))


def test_batch_not_divisible_by_data_parallel_is_refused():
    cfg = _cfg((8, 1, 1), **{"teacher.train.batch_size": 12})
    with pytest.raises(ConfigError, match="teacher.train.batch_size=12 is not divisible by mesh data\\*fsdp = 8"):
        Trainer(cfg, "teacher", make_mesh(cfg))


def test_indivisible_parameter_dim_names_the_parameter():
    cfg = _cfg((1, 1, 8))  # 4 heads (and a 50-token vocabulary) cannot be split 8 ways
    with pytest.raises(ConfigError, match="parameter \\S+ dim \\d+ is not divisible by mesh axis 'tensor' of size 8"):
        Trainer(cfg, "teacher", make_mesh(cfg))
