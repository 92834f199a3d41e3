"""LoRA students: at init the adapted model IS the base model; distillation changes only the
adapted weights, by a low-rank update, and works for the adaptive student (values w.r.t.
the adapters) with bf16 compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.config import ConfigError, DistillConfig
from experiments.distillation import distil
from experiments.train import RoleModel
from models import lora
from models import transformer as tfm

VOCAB = 40
LORA = lora.LoraConfig(rank=2, alpha=4.0, targets=("wq_dnh", "wo_nhd", "w_down_fd"), layers=(1,))


def _student(compute_dtype="float32"):
    cfg = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype=compute_dtype)
    graphdef, params = tfm.split_params(tfm.build(cfg, VOCAB, seed=0))
    return RoleModel(cfg, graphdef, params, None)


def _traces(seeds=2, n=16, t=12):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (seeds, n, t)).astype(np.int32)
    mask = np.ones((seeds, n, t), np.float32)
    mask[..., :4] = 0  # prompt
    return {"tokens_bt": tokens, "loss_mask_bt": mask}, {"tokens_bt": tokens[0], "loss_mask_bt": mask[0]}


def test_lora_at_init_equals_base_model():
    base = _student()
    adapters = lora.init_adapters(base.params, base.cfg, lora.LoraConfig(rank=4), jax.random.key(1))
    assert set(adapters) == {"block_0", "block_1"} and set(adapters["block_0"]) == {
        "wq_dnh",
        "wk_dkh",
        "wv_dkh",
        "wo_nhd",
    }
    tokens = jnp.asarray(_traces()[1]["tokens_bt"])
    merged, _ = tfm.forward(base.graphdef, lora.merge(base.params, adapters, lora.LoraConfig(rank=4)), tokens)
    plain, _ = tfm.forward(base.graphdef, base.params, tokens)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(plain))


@pytest.mark.parametrize("kind,compute_dtype", [("passive", "float32"), ("adaptive", "bfloat16")])
def test_lora_distillation_changes_only_adapted_weights_by_low_rank(kind, compute_dtype):
    base = _student(compute_dtype)
    traces, heldout = _traces()
    dc = DistillConfig(steps=4, batch_size=8, lr=3e-2, warmup_steps=1, heldout_batch=8, finetune="lora", lora=LORA)
    students = distil(base, traces, heldout, dc, kind, beta=1.0, seeds=2, progress=False)
    adapted = {("block_1", "attn", "wq_dnh"), ("block_1", "attn", "wo_nhd"), ("block_1", "mlp", "w_down_fd")}
    flat_base = dict(jax.tree_util.tree_flatten_with_path(base.params)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(students)[0]:
        key = tuple(k.key for k in path)
        before = np.asarray(flat_base[path])
        for s in range(2):
            after = np.asarray(value[s])
            if key not in adapted:
                np.testing.assert_array_equal(after, before, err_msg=str(key))
                continue
            n_in = before.shape[0] if key[-1] != "wo_nhd" else before.shape[0] * before.shape[1]
            delta = (after - before).reshape(n_in, -1)
            assert np.abs(delta).max() > 0, key
            assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) <= LORA.rank, key


def test_lora_config_is_checked():
    with pytest.raises(ValueError, match="unknown projection 'q_proj'"):
        lora.LoraConfig(targets=("q_proj",)).validate(2)
    base = _student()
    traces, heldout = _traces()
    dc = DistillConfig(steps=1, batch_size=4, finetune="lora", lora=dataclasses.replace(LORA, layers=(5,)))
    with pytest.raises(ConfigError, match="protocol.distill.lora.layers: block 5 does not exist"):
        distil(base, traces, heldout, dc, "passive", beta=0.0, seeds=2, progress=False)
