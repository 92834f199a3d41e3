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

Here: the name/layout map, the conversion, and the converted model cached as an orbax checkpoint.
config.json is read by models/hf_config.py, the tensors by models/hf_safetensors.py, tokenizer.json by
models/hf_tokenizer.py. ``HFLoadError``, ``load_tokenizer`` and ``check_shared_vocabulary`` are also reachable
here (experiments/protocol.py and experiments/train.py use them as ``hf_loader.<name>``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from models import sharding as shd
from models import transformer as tfm
from models.hf_config import HFLoadError, model_config_from_hf
from models.hf_safetensors import SafetensorsCheckpoint, read_tensor
from models.hf_tokenizer import check_shared_vocabulary as check_shared_vocabulary  # used as hf_loader.<name>
from models.hf_tokenizer import load_tokenizer, tokenizer_vocab_size

# Buffers some exporters store that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
        value = convert(read_tensor(info))
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
