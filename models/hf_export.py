"""Our params -> a Hugging Face Llama / Qwen2 checkpoint directory (the loader's inverse).

Writes `config.json`, `model.safetensors` (float32 or bfloat16, numpy only: no torch)
and, if given, `tokenizer.json`. Used to hand a model to HF tooling and, in tests, to
make checkpoint directories without torch. One tensor is gathered to the host at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from models import hf_loader
from models import transformer as tfm

_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: 8-byte header length, JSON header, then the raw little-endian tensors."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, allow_nan=False).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with epath.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def hf_config(cfg: tfm.ModelConfig, rows: int, family: str) -> dict:
    if family not in ("llama", "qwen2"):
        raise ValueError(f"family={family!r} must be 'llama' or 'qwen2'")
    if family == "llama" and cfg.qkv_bias:
        raise ValueError("a model with q/k/v biases exports as qwen2, not llama")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"],
        "model_type": family,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": rows,
        # A tied head that scales its logits has no HF equivalent: it exports untied, scale folded in.
        "tie_word_embeddings": cfg.tied_embeddings and not cfg.scale_tied_logits,
        "rope_theta": cfg.rope_base,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling_factor:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    if family == "qwen2":
        out["use_sliding_window"] = False
    return out


def export_hf(
    params: tfm.Params,
    cfg: tfm.ModelConfig,
    directory: str | os.PathLike,
    family: str,
    tokenizer_json: str | None = None,
    dtype: Any = np.float32,
) -> epath.Path:
    """Write `params` (our layout) as an HF `family` checkpoint in `directory`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def host(x):
        return np.asarray(jax.device_get(x), np.float32)

    rows, d = params["embed_vd"].shape
    hf = hf_config(cfg, rows, family)
    tensors: dict[str, np.ndarray] = {}
    qwen_cfg = cfg if cfg.qkv_bias or family == "llama" else dataclasses.replace(cfg, qkv_bias=True)
    for path, (key, hf_shape, _) in hf_loader.weight_map(qwen_cfg).items():
        node = params
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:  # Qwen2 always has q/k/v biases: ours had none, so they are zero
            tensors[key] = np.zeros(hf_shape, np.float32)
            continue
        value = host(node)
        if path[-1] in ("wq_dnh", "wk_dkh", "wv_dkh"):
            value = value.reshape(d, -1).T  # [d, n, h] -> [n*h, d]
        elif path[-1] == "wo_nhd":
            value = value.reshape(-1, d).T  # [n, h, d] -> [d, n*h]
        elif path[-1].startswith("w_"):
            value = value.T
        else:
            value = value.reshape(hf_shape)
        tensors[key] = value
    embed = host(params["embed_vd"])
    tensors["model.embed_tokens.weight"] = embed
    if not cfg.tied_embeddings:
        tensors["lm_head.weight"] = host(params["unembed_dv"]).T
    elif cfg.scale_tied_logits:
        tensors["lm_head.weight"] = embed * cfg.d_model**-0.5
    write_safetensors(
        directory / "model.safetensors", {k: np.ascontiguousarray(v).astype(dtype) for k, v in tensors.items()}
    )
    (directory / "config.json").write_text(json.dumps(hf, indent=2, allow_nan=False))
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    return directory
