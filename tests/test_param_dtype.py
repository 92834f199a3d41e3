"""`model.param_dtype: bfloat16`: parameters live on device in bf16 (half the bytes), the forward pass is the
float32 model's on the rounded weights, trained roles keep float32 optimizer moments, HF checkpoints load
straight into bf16 shards, and compile-check's memory shows the saving."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.config import ConfigError, load_config
from experiments.train import Trainer, init_role_model, make_mesh
from launch.compile_check import run_compile_check
from models import hf_export, hf_loader
from models import sharding as shd
from models import transformer as tfm

MESH_OVERRIDES = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _roles(dtype_overrides=()):
    cfg = load_config("ci", MESH_OVERRIDES + list(dtype_overrides))
    return cfg, make_mesh(cfg)


def test_bf16_params_are_bf16_on_device_and_forward_matches_float32():
    cfg, mesh = _roles()
    vocab = 56
    rc32 = cfg.teacher
    rc16 = dataclasses.replace(rc32, model=dataclasses.replace(rc32.model, param_dtype="bfloat16"))
    m32 = init_role_model(rc32, vocab, mesh, cfg.rules, seed=3)
    m16 = init_role_model(rc16, vocab, mesh, cfg.rules, seed=3)
    leaves32, leaves16 = jax.tree.leaves(m32.params), jax.tree.leaves(m16.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves16) and all(x.dtype == jnp.float32 for x in leaves32)
    for x in leaves16:  # on device, sharded by the rule table: every shard is bf16 (2 bytes per value)
        assert all(s.data.dtype == jnp.bfloat16 for s in x.addressable_shards)
    assert sum(x.nbytes for x in leaves16) * 2 == sum(x.nbytes for x in leaves32)
    # Same seed: the bf16 model is the float32 model rounded.
    for a, b in zip(leaves32, leaves16):
        assert b.sharding.spec == a.sharding.spec
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (8, 16)), jnp.int32)

    def fwd(m, p):
        return jax.jit(lambda p, t: tfm.forward(m.graphdef, p, t)[0])(p, tokens)

    logits32, logits16 = np.asarray(fwd(m32, m32.params)), np.asarray(fwd(m16, m16.params))
    assert logits16.dtype == np.float32
    # compute_dtype float32: exactly the float32 forward on the rounded weights ...
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), m32.params)
    np.testing.assert_allclose(logits16, np.asarray(fwd(m32, rounded)), rtol=1e-5, atol=1e-5)
    # ... and within bf16 rounding of the float32 model (relative step 2^-8 per weight, a few layers deep).
    err = np.abs(logits16 - logits32).max()
    assert 0 < err < 0.03 * np.abs(logits32).max(), err


def test_training_a_bf16_role_keeps_float32_moments():
    cfg, mesh = _roles(
        [
            "teacher.model.param_dtype=bfloat16",
            "teacher.train.steps=4",
            "teacher.train.batch_size=8",
            "teacher.train.warmup_steps=1",
        ]
    )
    trainer = Trainer(cfg, "teacher", mesh)
    moments = [x for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0]
    n_params = len(jax.tree.leaves(trainer.state["params"]))
    assert len(moments) == 2 * n_params and all(x.dtype == jnp.float32 for x in moments)  # mu and nu
    data = trainer.training_data()
    before = jax.tree.map(np.asarray, trainer.state["params"])
    state = trainer.state
    for step in range(2):  # step 0 has learning rate 0 (warmup)
        state, metrics = trainer.step_fn(state, shd.shard_batch(trainer.batch_at(data, step), mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["params"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    changed = [
        not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]))
    ]
    assert any(changed)


def test_hf_checkpoint_loads_into_bf16_shards(tmp_path, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokenizer.tokens)}, unk_token=tokenizer.tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = tfm.ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        qkv_bias=True,
        tied_embeddings=False,
        scale_tied_logits=False,
        vocab_rows=64,
    )
    _, params = tfm.split_params(tfm.build(cfg, tokenizer.vocab_size, seed=0))
    params = jax.device_get(params)
    directory = hf_export.export_hf(
        params, cfg, tmp_path / "qwen", "qwen2", tok.to_str(), dtype=hf_export.ml_dtypes.bfloat16
    )
    mesh = make_mesh(load_config("ci", MESH_OVERRIDES))
    loaded = hf_loader.load_hf_model(directory, mesh, param_dtype="bfloat16")
    assert loaded.cfg.param_dtype == "bfloat16"
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(loaded.params)[0], jax.tree_util.tree_flatten_with_path(params)[0]
    ):
        assert a.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
        # the checkpoint holds bf16 values: loading them as bf16 is exact
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b).astype(jnp.bfloat16), err_msg=jax.tree_util.keystr(path)
        )


def test_compile_check_memory_drops_by_two_bytes_per_parameter():
    """Data-parallel mesh: each device holds every parameter, so bf16 params save exactly 2 bytes per parameter
    of argument memory, while the float32 AdamW moments (8 bytes per parameter) stay."""
    f32 = run_compile_check(load_config("ci"), "local", ("teacher",))["roles"][0]
    bf16 = run_compile_check(load_config("ci", ["teacher.model.param_dtype=bfloat16"]), "local", ("teacher",))["roles"][
        0
    ]
    assert f32["params"] == bf16["params"]
    assert f32["argument_bytes"] - bf16["argument_bytes"] == 2 * f32["params"]
    assert bf16["argument_bytes"] >= 10 * bf16["params"]  # 2 (bf16 weights) + 4 + 4 (float32 moments)


def test_bad_param_dtype_is_one_line():
    with pytest.raises(ConfigError, match=r"^student.model.param_dtype='float16' must be 'float32' or 'bfloat16'$"):
        load_config("ci", ["student.model.param_dtype=float16"])
