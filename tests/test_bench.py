"""`distgame bench --compare-hf`: the same shapes timed in PyTorch + transformers, in one run.

Timings themselves cannot be asserted on a shared CPU; what is checked is that both sides run
the same model (parameter counts, PoE logits), that the ratios are the ratios of the reported
throughputs, and that the FLOPs bound is the closed form.
"""

import json

import numpy as np
import pytest

from experiments.tasks.tokenizer import build_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from experiments import bench_hf  # noqa: E402
from experiments.cli import main as distgame  # noqa: E402
from experiments.config import load_config  # noqa: E402
from models import transformer as tfm  # noqa: E402


def test_hf_llama_has_our_parameter_count():
    cfg = load_config("default")
    for role in ("teacher", "proxy", "student"):
        m = cfg.role(role).model
        ours = tfm.param_count(tfm.split_params(tfm.build(m, 50, 0))[1])
        theirs = sum(p.numel() for p in bench_hf.llama(m, 50, 128).parameters())
        assert ours == theirs, role


def test_hf_poe_processor_matches_uncached_proxy_logits():
    """The processor's proxy KV cache gives the same logits as a full forward over the prefix."""
    cfg = load_config("ci")
    proxy = bench_hf.llama(cfg.proxy.model, 50, 64, seed=3)
    gamma = 0.3
    proc = bench_hf.poe_processor(proxy, gamma)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(3, 50, (2, 5)))
    for step in range(3):
        scores = torch.randn(2, 50)
        out = proc(ids, scores)
        with torch.no_grad():
            z_p = proxy(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(out, (1 - gamma) * scores + gamma * z_p, rtol=1e-4, atol=1e-4)
        ids = torch.cat([ids, torch.as_tensor(rng.integers(3, 50, (2, 1)))], dim=1)


def test_hf_decode_generates_exactly_gen_len_tokens():
    cfg = load_config("ci")
    model = bench_hf.llama(cfg.teacher.model, 50, 64)
    proxy = bench_hf.llama(cfg.proxy.model, 50, 64, seed=1)
    prompts = np.random.default_rng(0).integers(3, 50, (3, 6))
    for p in (None, proxy):
        out = bench_hf.HFDecode(model, prompts, 7, proxy=p)()
        assert out.shape == (3, 13) and (out[:, :6].numpy() == prompts).all()


def test_cli_compare_hf_json(capsys):
    over = ["bench.iters=1", "bench.rounds=1", "bench.distill_steps=2", "run_dir=/tmp/unused-bench"]
    assert distgame(["bench", "--config", "ci", "--compare-hf", "--json", "--no-progress", *over]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert out[0].startswith("bench: teacher") and any("PyTorch" in line for line in out)
    for k in (
        "train_speedup_vs_hf",
        "decode_speedup_vs_hf",
        "poe_cost_ratio",
        "poe_flop_bound",
        "distill_passive_steps_per_s",
        "distill_adaptive_steps_per_s",
    ):
        assert np.isfinite(r[k]) and r[k] > 0, k
    # same token counts on both sides: the speed-ups are the throughput ratios
    assert r["train_speedup_vs_hf"] == pytest.approx(r["train_tokens_per_s"] / r["hf_train_tokens_per_s"])
    assert r["decode_speedup_vs_hf"] == pytest.approx(r["decode_cached_tokens_per_s"] / r["hf_decode_tokens_per_s"])
    assert r["poe_cost_ratio"] == pytest.approx(r["decode_cached_tokens_per_s"] / r["poe_decode_tokens_per_s"])
    cfg = load_config("ci")
    vocab = build_tokenizer().vocab_size
    context = cfg.bench.prompt_len + cfg.bench.gen_len // 2

    def flops(m):  # 2 FLOPs per multiply-add: projections, SwiGLU, attention at `context`, tied head
        d, n, k, h, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff
        return (
            m.n_layers * 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * n * h * context) + 2 * d * vocab
        )

    assert r["poe_flop_bound"] == pytest.approx(1 + flops(cfg.proxy.model) / flops(cfg.teacher.model))
    assert r["train_mfu"] is None  # a CPU has no bf16 peak in the table


def test_bench_rejects_nonpositive_sizes(capsys):
    assert distgame(["bench", "--config", "ci", "bench.rounds=0"]) == 2
    assert "bench.rounds=0 must be >= 1" in capsys.readouterr().err
