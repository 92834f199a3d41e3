"""HF checkpoints -> our model: logit and greedy-decoding parity with `transformers` on CPU.

Tiny random LlamaForCausalLM (Llama-3 RoPE scaling, tied head, explicit head_dim, padded
vocabulary) and Qwen2ForCausalLM (q/k/v biases, untied head) are built and saved with
`transformers`, loaded with our loader onto a 2x2x2 mesh, and compared. All torch work
happens once, in the module fixture (torch import is slow).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import hf_loader as hfl  # noqa: E402
from models import hf_tokenizer as hft  # noqa: E402
from models import transformer as tfm  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.sampling import ExpertSpec, Single, generate  # noqa: E402
from models.sharding import MeshConfig, make_mesh  # noqa: E402

ROWS = 256
BATCH, PROMPT, NEW = 4, 12, 32
SPECS = {
    # Llama-3: scaled RoPE (orig. context 32 so all three frequency bands occur), tied head, head_dim != d/n.
    "llama": dict(
        tokens=250,
        cls="LlamaForCausalLM",
        config=dict(
            model_type="llama",
            vocab_size=ROWS,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # Qwen2: q/k/v biases, untied head, default RoPE.
    "qwen2": dict(
        tokens=240,
        cls="Qwen2ForCausalLM",
        config=dict(
            model_type="qwen2",
            vocab_size=ROWS,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_theta=1000000.0,
        ),
    ),
}


def _write_tokenizer(directory, n_tokens, prefix="t"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(n_tokens)}, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def _randomise(model):
    """HF initialises biases to 0 and norms to 1; randomise every tensor so each one is tested."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Per family: checkpoint dir, HF logits on random tokens, HF greedy continuation (and a bf16 copy of Qwen2)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out = {}
    for family, spec in SPECS.items():
        directory = tmp_path_factory.mktemp(family)
        config = transformers.AutoConfig.for_model(**spec["config"])
        model = getattr(transformers, spec["cls"])._from_config(config, attn_implementation="eager").eval()
        _randomise(model)
        # Qwen2 is saved in several files with an index json, as large checkpoints are.
        model.save_pretrained(directory, max_shard_size="200KB" if family == "qwen2" else "5GB")
        _write_tokenizer(directory, spec["tokens"])
        tokens = rng.integers(0, spec["tokens"], (BATCH, 40))
        prompt = rng.integers(0, spec["tokens"], (BATCH, PROMPT))
        with torch.no_grad():
            logits = model(torch.as_tensor(tokens)).logits.float().numpy()
            greedy = model.generate(
                torch.as_tensor(prompt),
                attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                suppress_tokens=list(range(spec["tokens"], ROWS)),  # HF samples padded rows; ours never does
            )[:, PROMPT:].numpy()
        out[family] = dict(dir=directory, tokens=tokens, logits=logits, prompt=prompt, greedy=greedy)
        if family == "qwen2":
            bf16_dir = tmp_path_factory.mktemp("qwen2_bf16")
            model.to(torch.bfloat16).save_pretrained(bf16_dir)
            _write_tokenizer(bf16_dir, spec["tokens"])
            out["qwen2_bf16"] = dict(dir=bf16_dir, state={k: v.float().numpy() for k, v in model.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("family", list(SPECS))
def test_logits_match_transformers(hf_models, mesh, family):
    ref = hf_models[family]
    if family == "qwen2":
        assert (
            len(list(ref["dir"].glob("*.safetensors"))) > 1 and (ref["dir"] / "model.safetensors.index.json").exists()
        )
    loaded = hfl.load_hf_model(ref["dir"], mesh)
    assert loaded.vocab_size == SPECS[family]["tokens"]
    assert loaded.params["embed_vd"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    logits, _ = jax.jit(tfm.forward, static_argnums=0)(loaded.graphdef, loaded.params, jnp.asarray(ref["tokens"]))
    logits = np.asarray(logits)
    v = loaded.vocab_size
    np.testing.assert_allclose(logits[..., :v], ref["logits"][..., :v], atol=1e-4, rtol=0)
    assert np.all(logits[..., v:] == tfm.PADDED_LOGIT)  # padding rows can never be sampled


@pytest.mark.parametrize("family", list(SPECS))
def test_32_greedy_tokens_match_transformers_generate(hf_models, mesh, family):
    ref = hf_models[family]
    loaded = hfl.load_hf_model(ref["dir"], mesh)
    out = generate(
        (ExpertSpec(loaded.graphdef, loaded.cfg),),
        (loaded.params,),
        jnp.asarray(ref["prompt"], jnp.int32),
        jnp.full((BATCH,), PROMPT, jnp.int32),
        jax.random.key(0),
        combiner=Single(),
        max_new_tokens=NEW,
        eos_id=-1,
        pad_id=0,
        greedy=True,
    )
    np.testing.assert_array_equal(np.asarray(out["tokens_bn"]), ref["greedy"])


def test_bf16_checkpoint_loads_exactly(hf_models, mesh):
    ref = hf_models["qwen2_bf16"]
    loaded = hfl.load_hf_model(ref["dir"], mesh)
    np.testing.assert_array_equal(np.asarray(loaded.params["embed_vd"]), ref["state"]["model.embed_tokens.weight"])
    q = ref["state"]["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(loaded.params["block_1"]["attn"]["wq_dnh"]), q.T.reshape(64, 4, 16))
    np.testing.assert_array_equal(
        np.asarray(loaded.params["block_1"]["attn"]["bk_kh"]),
        ref["state"]["model.layers.1.self_attn.k_proj.bias"].reshape(2, 16),
    )


def test_vocab_rows_pad_to_match_another_model(hf_models, mesh):
    loaded = hfl.load_hf_model(hf_models["llama"]["dir"], mesh, vocab_rows=264)
    base = hfl.load_hf_model(hf_models["llama"]["dir"], mesh)
    tokens = jnp.asarray(hf_models["llama"]["tokens"])
    padded, _ = tfm.forward(loaded.graphdef, loaded.params, tokens)
    plain, _ = tfm.forward(base.graphdef, base.params, tokens)
    assert padded.shape[-1] == 264
    np.testing.assert_allclose(np.asarray(padded[..., :ROWS]), np.asarray(plain), atol=1e-5)
    cut = hfl.load_hf_model(hf_models["llama"]["dir"], mesh, vocab_rows=252)  # drop padding rows only
    np.testing.assert_array_equal(np.asarray(cut.params["embed_vd"]), np.asarray(base.params["embed_vd"])[:252])
    with pytest.raises(hfl.HFLoadError, match="vocab_rows=248 is smaller than the tokenizer's 250 tokens"):
        hfl.load_hf_model(hf_models["llama"]["dir"], mesh, vocab_rows=248)


def test_converted_model_saves_and_restores_with_orbax(hf_models, mesh, tmp_path):
    loaded = hfl.load_hf_model(hf_models["qwen2"]["dir"], mesh)
    hfl.save_converted(loaded, tmp_path / "cache", source=str(hf_models["qwen2"]["dir"]))
    again = hfl.restore_converted(tmp_path / "cache", mesh)
    assert again.cfg == loaded.cfg and again.vocab_size == loaded.vocab_size
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(again.params)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    with pytest.raises(CheckpointError):
        hfl.restore_converted(tmp_path / "nothing", mesh)


# -- bad input: one line naming the file or key -------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_directory_without_expected_files_is_refused(hf_models, mesh, tmp_path):
    with pytest.raises(hfl.HFLoadError, match="config.json: missing"):
        hfl.load_hf_model(tmp_path, mesh)
    d = _copy(hf_models["llama"]["dir"], tmp_path / "no_weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(hfl.HFLoadError, match=r"no \*.safetensors"):
        hfl.load_hf_model(d, mesh)
    d = _copy(hf_models["qwen2"]["dir"], tmp_path / "lost_shard")
    lost = sorted(d.glob("*.safetensors"))[-1]
    lost.unlink()
    with pytest.raises(hfl.HFLoadError, match=f"{lost.name}: listed in model.safetensors.index.json but missing"):
        hfl.load_hf_model(d, mesh)
    d = _copy(hf_models["llama"]["dir"], tmp_path / "no_tok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(hfl.HFLoadError, match="tokenizer.json: missing"):
        hfl.load_hf_model(d, mesh)


def test_unsupported_architecture_is_refused(hf_models, mesh, tmp_path):
    d = _copy(hf_models["llama"]["dir"], tmp_path / "gpt2")
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(hfl.HFLoadError, match="GPT2LMHeadModel.*not supported"):
        hfl.load_hf_model(d, mesh)


def test_shape_disagreeing_with_config_is_refused(hf_models, mesh, tmp_path):
    d = _copy(hf_models["qwen2"]["dir"], tmp_path / "bad_shape")
    _edit_config(d, intermediate_size=128)
    with pytest.raises(
        hfl.HFLoadError,
        match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[160, 64\] but config.json implies \[128, 64\]",
    ):
        hfl.load_hf_model(d, mesh)


def test_differing_tokenizers_are_refused(hf_models, tmp_path):
    a = hft.load_tokenizer(hf_models["llama"]["dir"])
    assert hft.tokenizer_vocab_size(a) == 250
    hft.check_shared_vocabulary(a, hft.load_tokenizer(hf_models["llama"]["dir"]))
    _write_tokenizer(tmp_path, 250, prefix="w")
    with pytest.raises(hfl.HFLoadError, match="teacher and proxy tokenizers differ"):
        hft.check_shared_vocabulary(a, hft.load_tokenizer(tmp_path))
