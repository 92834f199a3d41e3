"""The one-GPU config (experiments/configs/gpu_h100.yaml), checked on the CPU without allocating it.

Every role is built abstractly (nnx.eval_shape: shapes and dtypes, no weights), its parameters
counted, and its train step and cached decoding traced with jax.eval_shape. The parameter counts
are compared with a closed form of the Llama architecture.
"""

import jax
import jax.numpy as jnp
import pytest

from experiments.config import ROLES, load_config
from experiments.device_peaks import lookup
from experiments.tasks.tokenizer import build_tokenizer
from experiments.train import abstract_role_model, make_mesh, make_optimizer, make_train_step, train_state_shardings
from game.defenses import PoE
from models import transformer as tfm
from models.sampling import ExpertSpec, generate


def closed_form_params(m: tfm.ModelConfig, vocab: int) -> int:
    d, n, k, h, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d  # q, k, v, o, SwiGLU, two norms
    return m.n_layers * per_layer + vocab * d * (1 if m.tied_embeddings else 2) + d


@pytest.fixture(scope="module")
def gpu():
    cfg = load_config("gpu_h100")
    mesh = make_mesh(cfg, jax.devices()[:1])  # one GPU: data=-1 resolves to 1
    vocab = build_tokenizer().vocab_size
    models = {r: abstract_role_model(cfg.role(r), vocab, mesh, cfg.rules, 0) for r in ROLES}
    return cfg, mesh, vocab, models


def test_sizes_dtypes_and_relations(gpu):
    cfg, mesh, vocab, models = gpu
    counts = {r: tfm.param_count(m.params) for r, m in models.items()}
    for r in ROLES:
        assert counts[r] == closed_form_params(cfg.role(r).model, vocab), r
        assert cfg.role(r).model.compute_dtype == "bfloat16"
    assert counts["teacher"] >= 1_000_000_000
    assert counts["proxy"] < counts["student"] < counts["teacher"]
    f = {r: tfm.flops_per_token(cfg.role(r).model, vocab, 64) for r in ROLES}
    assert f["proxy"] / f["teacher"] < 0.15  # PoE's FLOPs bound stays near 1
    # float32 params + AdamW moments + grads of the teacher fit an 80 GB GPU with room for activations
    assert 16 * counts["teacher"] < 0.3 * 80e9
    assert mesh.devices.size == 1 and cfg.teacher.train.batch_size % 1 == 0


def test_train_step_and_decode_trace_to_the_right_shapes(gpu):
    cfg, mesh, vocab, models = gpu
    t = models["teacher"]
    tc = cfg.teacher.train
    tx = make_optimizer(tc)
    shardings = train_state_shardings(tx, t.params, t.param_shardings, mesh)
    state = {
        "params": t.params,
        "opt_state": jax.eval_shape(tx.init, t.params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    seq = cfg.task.max_len
    batch = {
        "tokens_bt": jax.ShapeDtypeStruct((tc.batch_size, seq), jnp.int32),
        "loss_mask_bt": jax.ShapeDtypeStruct((tc.batch_size, seq), jnp.float32),
    }
    new_state, metrics = jax.eval_shape(make_train_step(t.graphdef, tx, shardings, mesh), state, batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state["params"]) == jax.tree.map(
        lambda x: (x.shape, x.dtype), t.params
    )
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32

    # PoE decoding: teacher + proxy in one sampler, bf16 KV caches, float32 logits
    p = models["proxy"]
    b, plen, n = cfg.sample.batch_size, 32, cfg.sample.max_new_tokens
    out = jax.eval_shape(
        lambda tp, pp, prompts, lens: generate(
            (ExpertSpec(t.graphdef, t.cfg), ExpertSpec(p.graphdef, p.cfg)),
            (tp, pp),
            prompts,
            lens,
            jax.random.key(0),
            combiner=PoE(0.5),
            max_new_tokens=n,
            eos_id=2,
            pad_id=0,
            greedy=False,
        ),
        t.params,
        p.params,
        jax.ShapeDtypeStruct((b, plen), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    assert out["tokens_bn"].shape == (b, n) and out["logprob_bn"].dtype == jnp.float32
    cache = jax.eval_shape(lambda: tfm.init_cache(t.cfg, b, plen + n))
    assert cache["block_0"]["k"].dtype == jnp.bfloat16


def test_peak_table_knows_the_gpus_and_tpus_jax_reports():
    assert lookup("NVIDIA H100 80GB HBM3").bf16_flops_per_s == 989e12
    assert lookup("NVIDIA H100 PCIe").bf16_flops_per_s == 756e12
    assert lookup("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert lookup("NVIDIA A100-SXM4-80GB").bf16_flops_per_s == 312e12
    assert lookup("TPU v5 lite").name == "TPU v5e" and lookup("TPU v5").name == "TPU v5p"
    assert lookup("TPU v4").bf16_flops_per_s == 275e12
    assert lookup("cpu") is None and lookup("TPU v40") is None
