"""Hugging Face Llama-3 / Qwen2 checkpoints -> our Transformer, streamed onto the mesh.

A checkpoint directory (local, or `gs://...` through etils.epath) holds `config.json`,
`*.safetensors` (with `model.safetensors.index.json` when sharded) and `tokenizer.json`.
`load_hf_model` maps config.json to a `ModelConfig`, then converts one tensor at a time:
view it in our layout (a memory map locally, a ranged read remotely) and let each device
copy and cast only its own shard (`jax.make_array_from_callback`), so neither a device
nor the host ever holds the whole model, and the host never a whole float32 tensor. bf16 checkpoints are read
through ml_dtypes (the `safetensors` package's numpy API cannot represent bf16).

Layout conversion (HF Linear weights are [out, in]): q/k/v `[n*h, d] -> [d, n, h]`,
o `[d, n*h] -> [n, h, d]`, MLP `[f, d] -> [d, f]`, lm_head `[V, d] -> [d, V]`. Our
rotary embedding already uses HF's rotate-half layout, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from models import sharding as shd
from models import transformer as tfm

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Buffers some exporters store that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFLoadError(ValueError):
    """A checkpoint directory that cannot become our model; the message names the file or key."""


# ---------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# safetensors, one tensor at a time
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    path: epath.Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _read_header(path: epath.Path) -> dict[str, TensorInfo]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HFLoadError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise HFLoadError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    return {
        key: TensorInfo(path, h["dtype"], tuple(h["shape"]), 8 + n + h["data_offsets"][0], 8 + n + h["data_offsets"][1])
        for key, h in header.items()
    }


def _read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor as a numpy array: a read-only memory map for local files, a ranged read otherwise."""
    if info.dtype not in _DTYPES:
        raise HFLoadError(f"{info.path}: tensor dtype {info.dtype} is not supported")
    dtype = np.dtype(_DTYPES[info.dtype])
    local = os.fspath(info.path) if os.path.exists(os.fspath(info.path)) else None
    if local is not None:
        count = (info.stop - info.start) // dtype.itemsize
        return np.memmap(local, dtype=dtype, mode="r", offset=info.start, shape=(count,)).reshape(info.shape)
    with info.path.open("rb") as f:
        f.seek(info.start)
        return np.frombuffer(f.read(info.stop - info.start), dtype=dtype).reshape(info.shape)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by HF name, from one or several safetensors files."""

    def __init__(self, directory: epath.Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise HFLoadError(f"{directory}: no *.safetensors files (expected model.safetensors or an index json)")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            if not (directory / name).exists():
                raise HFLoadError(f"{directory / name}: listed in model.safetensors.index.json but missing")
            self.tensors.update(_read_header(directory / name))

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise HFLoadError(f"tensor {key!r} is not in the checkpoint ({len(self.tensors)} tensors)")
        return self.tensors[key]


# ---------------------------------------------------------------------------
# HF names -> our parameter paths
# ---------------------------------------------------------------------------

Convert = Callable[[np.ndarray], np.ndarray]


def _linear_in_heads(heads: int, h: int) -> Convert:
    return lambda w: w.T.reshape(w.shape[1], heads, h)  # [n*h, d] -> [d, n, h]


def _out_from_heads(heads: int, h: int) -> Convert:
    return lambda w: w.T.reshape(heads, h, w.shape[0])  # [d, n*h] -> [n, h, d]


def _bias_heads(heads: int, h: int) -> Convert:
    return lambda b: b.reshape(heads, h)


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _same(w: np.ndarray) -> np.ndarray:
    return w


def weight_map(cfg: tfm.ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], Convert]]:
    """Our param path -> (HF tensor name, the HF shape config.json implies, conversion to our layout)."""
    d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out: dict[tuple[str, ...], tuple[str, tuple[int, ...], Convert]] = {}
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"block_{i}"
        out[(ours, "attn_norm", "scale_d")] = (hf + "input_layernorm.weight", (d,), _same)
        out[(ours, "mlp_norm", "scale_d")] = (hf + "post_attention_layernorm.weight", (d,), _same)
        out[(ours, "attn", "wq_dnh")] = (hf + "self_attn.q_proj.weight", (n * h, d), _linear_in_heads(n, h))
        out[(ours, "attn", "wk_dkh")] = (hf + "self_attn.k_proj.weight", (k * h, d), _linear_in_heads(k, h))
        out[(ours, "attn", "wv_dkh")] = (hf + "self_attn.v_proj.weight", (k * h, d), _linear_in_heads(k, h))
        out[(ours, "attn", "wo_nhd")] = (hf + "self_attn.o_proj.weight", (d, n * h), _out_from_heads(n, h))
        if cfg.qkv_bias:
            out[(ours, "attn", "bq_nh")] = (hf + "self_attn.q_proj.bias", (n * h,), _bias_heads(n, h))
            out[(ours, "attn", "bk_kh")] = (hf + "self_attn.k_proj.bias", (k * h,), _bias_heads(k, h))
            out[(ours, "attn", "bv_kh")] = (hf + "self_attn.v_proj.bias", (k * h,), _bias_heads(k, h))
        out[(ours, "mlp", "w_gate_df")] = (hf + "mlp.gate_proj.weight", (f, d), _transpose)
        out[(ours, "mlp", "w_up_df")] = (hf + "mlp.up_proj.weight", (f, d), _transpose)
        out[(ours, "mlp", "w_down_fd")] = (hf + "mlp.down_proj.weight", (d, f), _transpose)
    out[("final_norm", "scale_d")] = ("model.norm.weight", (d,), _same)
    return out


def _fit_rows(w_vd: np.ndarray, rows: int, vocab_size: int, key: str) -> np.ndarray:
    """Pad (zeros) or cut vocabulary rows to `rows`; only rows beyond the tokenizer may be cut."""
    have = w_vd.shape[0]
    if rows == have:
        return w_vd
    if rows < have:
        if rows < vocab_size:
            raise HFLoadError(f"{key}: cannot cut {have} vocabulary rows to {rows}, below the tokenizer's {vocab_size}")
        return w_vd[:rows]
    return np.concatenate([w_vd, np.zeros((rows - have, w_vd.shape[1]), w_vd.dtype)])


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def load_tokenizer(directory: str | os.PathLike):
    """The `tokenizers.Tokenizer` of `directory/tokenizer.json`."""
    from tokenizers import Tokenizer  # light, but only needed here

    path = epath.Path(directory) / "tokenizer.json"
    if not path.exists():
        raise HFLoadError(f"{path}: missing (the checkpoint directory needs tokenizer.json)")
    try:
        return Tokenizer.from_str(path.read_text())
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise HFLoadError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def tokenizer_vocab_size(tokenizer) -> int:
    """Ids 0..n-1 the tokenizer can emit (added/special tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def check_shared_vocabulary(tok_a, tok_b, names: tuple[str, str] = ("teacher", "proxy")) -> None:
    """PoE/ADS mix two models' logits id by id: refuse tokenizers that map any token to a different id."""
    va, vb = tok_a.get_vocab(with_added_tokens=True), tok_b.get_vocab(with_added_tokens=True)
    if va != vb:
        only_a = sorted(set(va.items()) - set(vb.items()))[:3]
        only_b = sorted(set(vb.items()) - set(va.items()))[:3]
        raise HFLoadError(
            f"{names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} tokens; e.g. {names[0]} has "
            f"{only_a}, {names[1]} has {only_b}); PoE and ADS need one shared vocabulary"
        )


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    cfg: tfm.ModelConfig
    vocab_size: int  # the tokenizer's; embedding rows beyond it are padding
    graphdef: Any
    params: Any
    param_shardings: Any
    tokenizer: Any


def _require(directory: epath.Path) -> dict:
    if not directory.is_dir():
        raise HFLoadError(f"{directory}: not a directory (expected config.json, *.safetensors, tokenizer.json)")
    path = directory / "config.json"
    if not path.exists():
        raise HFLoadError(f"{path}: missing (the checkpoint directory needs config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise HFLoadError(f"{path}: not valid JSON ({e})") from None


def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf_model(
    directory: str | os.PathLike, mesh, rules: dict[str, str | None] = shd.DEFAULT_RULES, **overrides: Any
) -> LoadedModel:
    """Convert an HF checkpoint directory into sharded params on `mesh` (in `param_dtype`: float32 by default).

    `overrides` set ModelConfig fields on top of config.json, e.g. compute_dtype="bfloat16",
    param_dtype="bfloat16" or vocab_rows=152064 (pad the vocabulary to match another model or the tensor axis).
    """
    directory = epath.Path(directory)
    hf = _require(directory)
    cfg = model_config_from_hf(hf, str(directory / "config.json"), **overrides)
    tokenizer = load_tokenizer(directory)
    vocab_size = tokenizer_vocab_size(tokenizer)
    try:
        rows = cfg.rows(vocab_size)
    except ValueError as e:
        raise HFLoadError(f"{directory}: {e}") from None
    ckpt = SafetensorsCheckpoint(directory)

    graphdef, abstract_params, shardings = _abstract_sharded(cfg, vocab_size, mesh, rules)
    shardings_flat = dict(_flat(shardings))
    expected_flat = dict(_flat(abstract_params))

    hf_rows = int(hf["vocab_size"])
    sources = weight_map(cfg)
    sources[("embed_vd",)] = ("model.embed_tokens.weight", (hf_rows, cfg.d_model), _same)
    if not cfg.tied_embeddings:
        sources[("unembed_dv",)] = ("lm_head.weight", (hf_rows, cfg.d_model), _same)
    missing = set(expected_flat) - set(sources)
    assert not missing, f"no HF source for {sorted(missing)}"  # a bug here, not user input

    params: dict = {}
    param_dtype = np.dtype(ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else np.float32)
    for path, (key, hf_shape, convert) in sources.items():
        info = ckpt.info(key)
        if info.shape != hf_shape:
            raise HFLoadError(
                f"{info.path.name}: tensor {key!r} has shape {list(info.shape)} but config.json implies {list(hf_shape)}"
            )
        # A view of the file in our layout (transposes and head splits are strided views, not copies) ...
        value = convert(_read_tensor(info))
        if path[-1] in ("embed_vd", "unembed_dv"):
            value = _fit_rows(value, rows, vocab_size, key)
            if path[-1] == "unembed_dv":
                value = value.T
        want = expected_flat[path]
        assert value.shape == want.shape, (path, value.shape, want.shape)

        # ... from which each device copies (and casts to the model's param_dtype) only its own shard.
        def shard(idx, v=value):
            return np.ascontiguousarray(v[idx], dtype=param_dtype)

        _set(params, path, jax.make_array_from_callback(value.shape, shardings_flat[path], shard))
        del value

    used = {key for key, _, _ in sources.values()}
    if cfg.tied_embeddings:
        used.add("lm_head.weight")  # some exporters store the tied head anyway
    extra = [k for k in ckpt.tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise HFLoadError(
            f"{directory}: checkpoint tensors not used by a {cfg.n_layers}-layer model: {sorted(extra)[:5]}"
        )
    return LoadedModel(cfg, vocab_size, graphdef, params, shardings, tokenizer)


# ---------------------------------------------------------------------------
# Converted once, reused: an orbax checkpoint plus the config and tokenizer
# ---------------------------------------------------------------------------


def _abstract_sharded(cfg: tfm.ModelConfig, vocab_size: int, mesh, rules) -> tuple[Any, Any, Any]:
    abstract_model = nnx.eval_shape(lambda: tfm.build(cfg, vocab_size, 0))
    graphdef, abstract_params = tfm.split_params(abstract_model)
    shardings = shd.param_shardings(tfm.logical_axes(abstract_model), abstract_params, rules, mesh)
    return graphdef, abstract_params, shardings


def save_converted(loaded: LoadedModel, directory: str | os.PathLike, source: str = "") -> None:
    """Write `directory/{model.json, tokenizer.json, orbax/}` so `restore_converted` skips the conversion."""
    from models.checkpoint import Checkpointer

    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(os.fspath(directory / "orbax"), keep=1)
    try:
        ckpt.save(0, {"params": loaded.params}, {"source": source})
    finally:
        ckpt.close()
    (directory / "tokenizer.json").write_text(loaded.tokenizer.to_str())
    # Written last: its presence marks a complete conversion.
    meta = {"model": dataclasses.asdict(loaded.cfg), "vocab_size": loaded.vocab_size, "source": source}
    (directory / "model.json").write_text(json.dumps(meta, indent=2, allow_nan=False))


def restore_converted(
    directory: str | os.PathLike, mesh, rules: dict[str, str | None] = shd.DEFAULT_RULES
) -> LoadedModel:
    """The model `save_converted` wrote, restored straight onto its shards."""
    from models.checkpoint import Checkpointer, CheckpointError

    directory = epath.Path(directory)
    if not (directory / "model.json").exists():
        raise CheckpointError(f"{directory / 'model.json'}: missing; no converted HF model in {directory}")
    meta = json.loads((directory / "model.json").read_text())
    cfg = tfm.ModelConfig(**meta["model"])
    graphdef, abstract_params, shardings = _abstract_sharded(cfg, meta["vocab_size"], mesh, rules)
    target = {
        "params": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings
        )
    }
    ckpt = Checkpointer(os.fspath(directory / "orbax"), create=False)
    try:
        state, _ = ckpt.restore(target)
    finally:
        ckpt.close()
    return LoadedModel(cfg, meta["vocab_size"], graphdef, state["params"], shardings, load_tokenizer(directory))


def load_or_convert(
    hf_dir: str | os.PathLike, cache_dir: str | os.PathLike | None, mesh, rules=shd.DEFAULT_RULES, **overrides: Any
) -> LoadedModel:
    """Restore the cached conversion of `hf_dir` from `cache_dir` if it has one with the same params, else convert
    (and cache, replacing a stale conversion). Overrides that do not change the params (compute_dtype) apply either way."""
    if cache_dir is not None:
        cache = epath.Path(cache_dir)
        if (cache / "model.json").exists():
            meta = json.loads((cache / "model.json").read_text())
            same_params = meta.get("source") == str(hf_dir) and all(
                meta["model"].get(k) == v for k, v in overrides.items() if k != "compute_dtype"
            )
            if same_params:
                loaded = restore_converted(cache, mesh, rules)
                loaded.cfg = dataclasses.replace(loaded.cfg, **overrides)
                return loaded
        if cache.exists():
            cache.rmtree()  # our own cache of another conversion
    loaded = load_hf_model(hf_dir, mesh, rules, **overrides)
    if cache_dir is not None:
        save_converted(loaded, cache_dir, source=str(hf_dir))
    return loaded
