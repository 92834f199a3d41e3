"""The protocol end to end with HF checkpoints standing in for the paper's trio, on CPU:
a Qwen2 teacher (q/k/v biases, untied head, 64 vocabulary rows), a Qwen2 proxy (tied head,
58 rows, padded to the teacher's 64 by config), and a Llama-3 student (scaled RoPE,
tied head) trained with LoRA. The checkpoints are written with our exporter (numpy, no
torch) over the task's own vocabulary as tokenizer.json; `test_hf_loader.py` proves
the loader against `transformers`. Also: export -> load round trip, and the bad-input
lines of the CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.tasks.tokenizer import build_tokenizer
from models import hf_export, hf_loader
from models import transformer as tfm
from models.sharding import MeshConfig, make_mesh


def _tokenizer_json(tokens) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


TRIO = {
    "teacher": (
        "qwen2",
        tfm.ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=64,
            qkv_bias=True,
            tied_embeddings=False,
            rope_base=1e6,
            vocab_rows=64,
        ),
    ),
    "proxy": (
        "qwen2",
        tfm.ModelConfig(
            d_model=16,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            d_ff=32,
            qkv_bias=True,
            scale_tied_logits=False,
            vocab_rows=58,
        ),
    ),
    "student": (
        "llama",
        tfm.ModelConfig(
            d_model=16,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            d_ff=32,
            head_size=16,
            scale_tied_logits=False,
            rope_base=5e5,
            rope_scaling_factor=8.0,
            rope_original_max_len=32,
            norm_eps=1e-5,
        ),
    ),
}


def _randomise_biases(params, seed):
    rng = np.random.default_rng(seed)
    for block in (k for k in params if k.startswith("block_")):
        for name in ("bq_nh", "bk_kh", "bv_kh"):
            if name in params[block]["attn"]:
                params[block]["attn"][name] = rng.normal(0, 0.1, params[block]["attn"][name].shape).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("hf_trio")
    dirs = {}
    for i, (role, (family, cfg)) in enumerate(TRIO.items()):
        _, params = tfm.split_params(tfm.build(cfg, tok.vocab_size, seed=i))
        params = _randomise_biases(jax.device_get(params), i)
        dirs[role] = hf_export.export_hf(
            params,
            cfg,
            root / role,
            family,
            _tokenizer_json(tok.tokens),
            dtype=np.float32 if role == "student" else hf_export.ml_dtypes.bfloat16,
        )
        dirs[role + "_params"] = params
    return dirs


def test_export_then_load_round_trips(trio):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    loaded = hf_loader.load_hf_model(trio["student"], mesh)
    original = trio["student_params"]
    assert loaded.cfg.rope_scaling_factor == 8.0 and loaded.cfg.head_dim == 16 and loaded.cfg.tied_embeddings
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(loaded.params)[0], jax.tree_util.tree_flatten_with_path(original)[0]
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def distgame(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def _trio_overrides(trio, run_dir):
    return [
        f"run_dir={run_dir}",
        f"teacher.hf_dir={trio['teacher']}",
        f"proxy.hf_dir={trio['proxy']}",
        f"student.hf_dir={trio['student']}",
    ]


def test_protocol_end_to_end_with_hf_trio(trio, tmp_path):
    result = distgame(
        "protocol",
        "--config",
        "ci",
        "--seeds",
        "1",
        *_trio_overrides(trio, tmp_path),
        "proxy.model.vocab_rows=64",
        "protocol.defenses=[{name: standard}, {name: poe, strength: 0.5}]",
        "sample.max_new_tokens=16",
        "protocol.distill.betas=[]",
        "protocol.distill.attacks=[]",  # adaptive + LoRA: test_lora.py
        "protocol.distill.finetune=lora",
        "protocol.distill.lora.targets=[wq_dnh, wv_dkh, w_down_fd]",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 2
    text = (tmp_path / "RESULTS.md").read_text()
    assert "poe γ=0.5" in text
    for role in ("teacher", "proxy", "student"):  # converted once, cached as orbax
        assert (tmp_path / role / "hf_converted" / "model.json").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "",
            "teacher and proxy vocabularies differ (64 vs 58 embedding rows); PoE and ADS need one vocabulary: "
            "if the tokenizers agree and only the padding differs, set proxy.model.vocab_rows=64",
        ),
        ("proxy.model.vocab_rows=40", "proxy.hf_dir: "),
        ("student.hf_dir=/nonexistent/llama", "student.hf_dir: /nonexistent/llama: not a directory"),
    ],
)
def test_hf_trio_bad_input_is_one_line(trio, tmp_path, override, message):
    result = distgame("protocol", "--config", "ci", *_trio_overrides(trio, tmp_path), *([override] if override else []))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_teacher_and_proxy_with_different_tokenizers_are_refused(trio, tmp_path):
    other = tmp_path / "proxy_other_tok"
    import shutil

    shutil.copytree(trio["proxy"], other)
    tokens = list(build_tokenizer().tokens)
    tokens[5], tokens[6] = tokens[6], tokens[5]
    (other / "tokenizer.json").write_text(_tokenizer_json(tokens))
    result = distgame(
        "protocol",
        "--config",
        "ci",
        *_trio_overrides(trio, tmp_path / "run"),
        f"proxy.hf_dir={other}",
        "proxy.model.vocab_rows=64",
    )
    assert result.returncode == 2
    assert "proxy.hf_dir: its tokenizer.json" in result.stderr and "is not the task's tokenizer" in result.stderr


def test_conversion_is_cached_and_redone_only_when_params_change(trio, tmp_path):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    cache = tmp_path / "cache"
    first = hf_loader.load_or_convert(trio["proxy"], cache, mesh)
    stamp = (cache / "model.json").stat().st_mtime_ns
    again = hf_loader.load_or_convert(trio["proxy"], cache, mesh, compute_dtype="bfloat16")
    assert (cache / "model.json").stat().st_mtime_ns == stamp  # restored, not converted
    assert again.cfg == dataclasses.replace(first.cfg, compute_dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(again.params["embed_vd"]), np.asarray(first.params["embed_vd"]))
    padded = hf_loader.load_or_convert(trio["proxy"], cache, mesh, vocab_rows=64)
    assert padded.params["embed_vd"].shape[0] == 64
    assert json.loads((cache / "model.json").read_text())["model"]["vocab_rows"] == 64
