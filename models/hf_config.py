"""Hugging Face config.json -> our ``ModelConfig`` (Llama-3 and Qwen2 architectures), from a checkpoint directory
or, when that is unreachable, from the published configs bundled in models/hf_configs/; and ``HFLoadError``, the
one error every step of loading an HF checkpoint raises, naming the file or key."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from models import transformer as tfm

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class HFLoadError(ValueError):
    """A checkpoint directory that cannot become our model; the message names the file or key."""


def _rope_settings(hf: dict, where: str) -> dict:
    """RoPE base and Llama-3 scaling from either transformers v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_base": float(base)}
    if kind == "llama3":
        out.update(
            rope_scaling_factor=float(merged["factor"]),
            rope_low_freq_factor=float(merged["low_freq_factor"]),
            rope_high_freq_factor=float(merged["high_freq_factor"]),
            rope_original_max_len=int(merged["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise HFLoadError(f"{where}: rope type {kind!r} is not supported (only 'default' and 'llama3')")
    return out


def model_config_from_hf(hf: dict, where: str = "config.json", **overrides: Any) -> tfm.ModelConfig:
    """Our ModelConfig for an HF config.json dict; `overrides` (e.g. compute_dtype, vocab_rows) win."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None or hf.get("model_type") != SUPPORTED_ARCHITECTURES[arch]:
        raise HFLoadError(
            f"{where}: architecture {archs or None} / model_type {hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(f'{a} ({t})' for a, t in SUPPORTED_ARCHITECTURES.items())}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    if hf.get("hidden_act", "silu") != "silu":
        raise HFLoadError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise HFLoadError(f"{where}: attention_bias/mlp_bias=true is not supported for Llama")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise HFLoadError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    try:
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        fields = dict(
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_ff=int(hf["intermediate_size"]),
            head_size=int(hf.get("head_dim") or d_model // n_heads),
            qkv_bias=family == "qwen2",
            tied_embeddings=bool(hf.get("tie_word_embeddings", family == "llama")),
            scale_tied_logits=False,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            vocab_rows=int(hf["vocab_size"]),
            **_rope_settings(hf, where),
        )
    except KeyError as e:
        raise HFLoadError(f"{where}: missing key {e.args[0]!r}") from None
    fields.update(overrides)
    cfg = tfm.ModelConfig(**fields)
    try:
        cfg.validate(where)
    except ValueError as e:
        raise HFLoadError(str(e)) from None
    return cfg


PUBLISHED_CONFIGS = epath.Path(__file__).parent / "hf_configs"


def architecture(hf_dir: str, **overrides: Any) -> tuple[tfm.ModelConfig, str]:
    """(ModelConfig, where its config.json came from) of a checkpoint directory without its weights: its own
    config.json when readable, else the published one bundled in models/hf_configs/ under the directory's last
    name (so a placeholder or unreachable gs:// path still has an architecture for compile-check and bench)."""
    source = epath.Path(hf_dir) / "config.json"
    try:
        hf = json.loads(source.read_text())
    except Exception:  # unreachable bucket, no gcsfs or credentials, placeholder path
        source = PUBLISHED_CONFIGS / f"{str(hf_dir).rstrip('/').rsplit('/', 1)[-1]}.json"
        if not source.exists():
            known = ", ".join(sorted(p.stem for p in PUBLISHED_CONFIGS.glob("*.json")))
            raise HFLoadError(
                f"{hf_dir}: cannot read its config.json, and models/hf_configs/ has no {source.name} (known: {known})"
            ) from None
        hf = json.loads(source.read_text())
    return model_config_from_hf(hf, str(source), **overrides), str(source)
