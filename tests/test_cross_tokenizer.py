"""The paper's trio shape on CPU: a tiny random Qwen2 teacher and proxy sharing one byte-level BPE
tokenizer.json, a tiny Llama student with a different tokenizer.json (other ids, other merges), run by
`distgame protocol --config gsm8k_paper_tpu` (shrunk by overrides) on mock GSM8K: the same code path as the
TPU config, with bf16 weights and a LoRA student. Traces reach the student as text, re-encoded with its
tokenizer; token-level attacks and a proxy with another vocabulary are refused in one line."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import retokenize as retok
from experiments.tasks.text_tokenizers import HFTokenizer
from models import hf_export
from models import transformer as tfm

HERE = pathlib.Path(__file__).parent


def byte_level_tokenizer(first: list[str], last: list[str], merges: list[tuple[str, str]]) -> str:
    """A byte-level BPE tokenizer.json (any text round-trips): special tokens before and/or after the 256
    byte symbols, and a few merges, so two of them give the same text different ids and lengths."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for t in [*first, *sorted(pre_tokenizers.ByteLevel.alphabet()), *(a + b for a, b in merges), *last]:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in first + last])
    return tok.to_str()


QWEN_TOKENIZER = byte_level_tokenizer([], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [("Ġ", "t"), ("h", "e")])
LLAMA_TOKENIZER = byte_level_tokenizer(
    ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"], [], [("Ġ", "a"), ("e", "s"), ("Ġ", "b")]
)
ROLES = {  # (family, config, tokenizer.json): Qwen2 teacher and proxy (one vocabulary, 264 rows), Llama student
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
            vocab_rows=264,
        ),
        QWEN_TOKENIZER,
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
            vocab_rows=264,
        ),
        QWEN_TOKENIZER,
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
            vocab_rows=264,
        ),
        LLAMA_TOKENIZER,
    ),
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_trio")
    dirs = {}
    for i, (role, (family, cfg, tok_json)) in enumerate(ROLES.items()):
        _, params = tfm.split_params(tfm.build(cfg, 262, seed=i))
        dirs[role] = str(
            hf_export.export_hf(
                jax.device_get(params), cfg, root / role, family, tok_json, dtype=hf_export.ml_dtypes.bfloat16
            )
        )
    return dirs


def _tok(directory) -> HFTokenizer:
    return HFTokenizer(pathlib.Path(directory) / "tokenizer.json")


# The driver serves mock GSM8K (tests/test_text_task.py) to the real CLI in a fresh process.
_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import test_text_task as t
from experiments import cli
with t.mock_gsm8k():
    sys.exit(cli.main(sys.argv[2:]))
"""


def distgame(command: str, trio, run_dir, *overrides):
    args = [
        command,
        "--config",
        "gsm8k_paper_tpu",
        f"run_dir={run_dir}",
        f"task.data_dir={pathlib.Path(run_dir).parent}",
        f"task.tokenizer={trio['teacher']}/tokenizer.json",
        "task.max_len=320",
        "task.n_train=1000",
        "task.n_heldout=4",
        "task.n_test=6",
        "mesh.data=-1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        *(f"{r}.hf_dir={trio[r]}" for r in ROLES),
        "proxy.model.vocab_rows=0",
        "sample.max_new_tokens=16",
        "sample.batch_size=8",
        "protocol.seeds=1",
        "protocol.n_traces=8",
        "protocol.cost_batch=8",
        "protocol.defenses=[{name: standard}, {name: poe, strength: 0.6}]",
        "protocol.distill.steps=2",
        "protocol.distill.batch_size=8",
        "protocol.distill.heldout_batch=4",
        "protocol.distill.lora.rank=8",
        "protocol.distill.lora.alpha=8.0",
        *overrides,
        "--no-progress",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, str(HERE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=HERE.parent,
    )


def test_retokenized_traces_are_the_same_text_and_keep_the_answer_checkable():
    """encode_traces on correct GSM8K solutions written in the teacher's ids: the student's rows decode to the
    same text with its own tokenizer, and the answer checker accepts them as it accepts the teacher's."""
    sys.path.insert(0, str(HERE))
    import test_text_task as t
    from tokenizers import Tokenizer

    from experiments.tasks.text_task import TextProblem, checker

    teacher = retok.wrap_hf_tokenizer(Tokenizer.from_str(QWEN_TOKENIZER), "qwen")
    student = retok.wrap_hf_tokenizer(Tokenizer.from_str(LLAMA_TOKENIZER), "llama")
    rows = t.TRAIN[:6]
    problems = [
        TextProblem(
            f"Question: {r['question']}\nAnswer:", " " + r["answer"], r["answer"].rsplit("#### ", 1)[1].replace(",", "")
        )
        for r in rows
    ]
    # What the sampler returns: the solution's teacher ids + EOS, then PAD; the last row hits the token budget.
    ids = [teacher.encode(p.solution) + [teacher.eos_id] for p in problems]
    ids[-1] = ids[-1][:-6]
    width = max(map(len, ids))
    tokens_bn = np.array([r + [teacher.pad_id] * (width - len(r)) for r in ids], np.int32)
    lengths_b = np.array([len(r) for r in ids], np.int32)
    ended = retok.ended_with_eos(tokens_bn, lengths_b, teacher.eos_id)
    assert ended.tolist() == [True] * 5 + [False]
    texts = [teacher.decode(r) for r in tokens_bn]
    out = retok.encode_traces(problems, texts, ended, student, max_len=400)
    is_correct = checker("gsm8k")
    for i, p in enumerate(problems):
        row, mask = out["tokens_bt"][i], out["loss_mask_bt"][i]
        prompt = [student.bos_id] + student.encode(p.prompt)
        assert row[: len(prompt)].tolist() == prompt
        targets = row[1:][mask[:-1] == 1]  # the tokens the student is trained to predict
        assert student.decode(targets) == texts[i]
        assert (targets[-1] == student.eos_id) == ended[i]
        assert is_correct(student.decode(targets), p.answer) == is_correct(texts[i], p.answer) == (i < 5)
        assert targets.tolist() != teacher.encode(texts[i])  # other ids for the same text
    short = retok.encode_traces(problems[:1], texts[:1], ended[:1], student, max_len=40)
    assert short["tokens_bt"].shape == (1, 40) and short["loss_mask_bt"][0, -1] == 0  # cut at max_len


def test_protocol_end_to_end_across_tokenizers(trio, tmp_path):
    run = tmp_path / "run"
    proc = distgame("protocol", trio, run, "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "gsm8k" and [r["label"] for r in results["rows"]] == ["standard", "poe γ=0.6"]
    for row in results["rows"]:
        assert set(row["students"]) == {"passive", "adaptive(beta=0.5)"}
        assert all(0 <= s["mean"] <= 1 for s in [row["teacher_accuracy"], *row["students"].values()])

    teacher, student = _tok(trio["teacher"]), _tok(trio["student"])
    assert (teacher.vocab_size, student.vocab_size) == (261, 262) and teacher.get_vocab() != student.get_vocab()
    (traces_file,) = (run / "protocol").glob("traces-standard-*.npz")
    tr = dict(np.load(traces_file))
    assert tr["student_tokens_bt"].shape == tr["tokens_bt"].shape
    differ = 0
    for i in range(tr["tokens_bt"].shape[1]):
        t_ids = tr["tokens_bt"][0, i, 1:][tr["loss_mask_bt"][0, i, :-1] == 1]
        s_ids = tr["student_tokens_bt"][0, i, 1:][tr["student_loss_mask_bt"][0, i, :-1] == 1]
        assert len(t_ids) and len(s_ids)
        assert student.decode(s_ids) == teacher.decode(t_ids)  # the same trace text in the student's ids
        assert s_ids.max() < student.vocab_size
        differ += t_ids.tolist() != s_ids.tolist()
    assert differ > 0
    for role in ROLES:
        meta = json.loads((run / role / "hf_converted" / "model.json").read_text())
        assert meta["model"]["param_dtype"] == "bfloat16"  # converted straight into bf16


@pytest.mark.parametrize("case", ["soft_topk", "proxy_vocabulary", "equilibrium"])
def test_what_cannot_cross_vocabularies_is_one_line(trio, tmp_path, case):
    command, overrides, message = {
        "soft_topk": (
            "protocol",
            ["protocol.expose_k=2", "protocol.distill.attacks=[soft_topk]", "protocol.distill.attack_defenses=[poe]"],
            "protocol.distill.attacks=['soft_topk'] need the teacher's per-token log-probs: the student's "
            "tokenizer (student.hf_dir, 262 tokens) is not the teacher's (261 tokens)",
        ),
        "proxy_vocabulary": (
            "protocol",
            ["proxy.hf_dir=" + str(tmp_path / "proxy_llama_vocab")],
            "proxy.hf_dir: its tokenizer.json (262 tokens) is not the task's tokenizer",
        ),
        "equilibrium": (
            "equilibrium",
            [],
            "distgame equilibrium (soft targets on teacher prefixes) needs the student to "
            "share the teacher's vocabulary",
        ),
    }[case]
    if case == "proxy_vocabulary":  # the proxy checkpoint with the student's tokenizer
        shutil.copytree(trio["proxy"], tmp_path / "proxy_llama_vocab")
        (tmp_path / "proxy_llama_vocab" / "tokenizer.json").write_text(LLAMA_TOKENIZER)
    proc = distgame(command, trio, tmp_path / "run", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    if case == "soft_topk":  # refused before any model was loaded or converted
        assert not (tmp_path / "run" / "teacher").exists()
