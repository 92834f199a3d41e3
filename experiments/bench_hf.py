"""The PyTorch / Hugging Face side of `distgame bench --compare-hf`: the same shapes in `transformers`.

A `LlamaForCausalLM` with our role's sizes (width, layers, query/KV heads, SwiGLU width,
vocabulary, tied head, RMSNorm epsilon), random weights, float32 on the CPU; torch's own
thread count (all cores, like XLA). Timed: one AdamW step with global-norm clipping (our
Trainer's step) and `generate` with sampling and the KV cache (our sampler), plus PoE decoding
with the proxy run beside the teacher by a logits processor that keeps the proxy's own KV cache.
"""

from __future__ import annotations

import time

import numpy as np

from experiments.config import ConfigError
from models.transformer import ModelConfig


def import_torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError(
            "bench --compare-hf needs torch and transformers (the test extra): pip install -e '.[test]'"
        ) from None
    return torch, transformers


def llama(cfg: ModelConfig, vocab: int, max_len: int, seed: int = 0):
    torch, transformers = import_torch()
    torch.manual_seed(seed)
    conf = transformers.LlamaConfig(
        vocab_size=cfg.rows(vocab),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tied_embeddings,
        max_position_embeddings=max_len,
        rope_theta=cfg.rope_base,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(conf).float().eval()


class HFTrainStep:
    """loss -> backward -> clip -> AdamW, on a fixed batch (what our train step does)."""

    def __init__(self, model, tokens_bt: np.ndarray, lr: float = 1e-4, clip: float = 1.0):
        torch, _ = import_torch()
        self.torch, self.model, self.clip = torch, model, clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.tokens = torch.as_tensor(tokens_bt, dtype=torch.long)

    def __call__(self) -> float:
        self.model.train()
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        if self.clip > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def poe_processor(proxy, gamma: float):
    """PoE(γ) as a logits processor: ((1-γ) z_T + γ z_P) with the proxy fed one token at a time
    through its own KV cache (so its cost per token is a cached step, as in our sampler)."""
    torch, transformers = import_torch()

    class PoE(transformers.LogitsProcessor):
        def __init__(self):
            self.cache, self.seen = None, 0

        def __call__(self, input_ids, scores):
            with torch.no_grad():
                new = input_ids[:, self.seen :]
                out = proxy(input_ids=new, past_key_values=self.cache, use_cache=True)
            self.cache, self.seen = out.past_key_values, input_ids.shape[1]
            return (1 - gamma) * scores + gamma * out.logits[:, -1].float()

    return PoE()


class HFDecode:
    """`generate` with sampling (τ=1, no top-k/top-p), KV cache, exactly `gen_len` new tokens."""

    def __init__(self, model, prompts_bp: np.ndarray, gen_len: int, proxy=None, gamma: float = 0.5):
        torch, _ = import_torch()
        self.torch, self.model, self.proxy, self.gamma = torch, model, proxy, gamma
        self.prompts = torch.as_tensor(prompts_bp, dtype=torch.long)
        self.mask = torch.ones_like(self.prompts)
        self.gen_len = gen_len

    def __call__(self):
        processors = [poe_processor(self.proxy, self.gamma)] if self.proxy is not None else None
        with self.torch.no_grad():
            return self.model.generate(
                input_ids=self.prompts,
                attention_mask=self.mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.gen_len,
                min_new_tokens=self.gen_len,
                use_cache=True,
                pad_token_id=0,
                logits_processor=processors,
            )


def time_call(fn, iters: int) -> float:
    """Median seconds per call over `iters` calls (after the caller's warm-up)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
