"""What the paper-scale run needs beyond the model trio: the two paper configs (settings, launch command, mesh
vs slice), memory-bounded passes over many sequences (g_P and the teacher's entropy in row chunks, distillation
batches split over the batch axes), and each process's share of the decoded prompts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from experiments.chunked import mean_nll_grad, row_chunks, seed_rows_sharded
from experiments.config import CONFIG_DIR, load_config
from experiments.evaluate import local_rows
from experiments.train import init_role_model, make_mesh, masked_nll
from launch.accelerators import ACCELERATORS, check_mesh_fits


@pytest.mark.parametrize("name, task, n_split", [("gsm8k_paper_tpu", "gsm8k", 7473), ("math_paper_tpu", "math", 7500)])
def test_paper_configs_carry_the_papers_settings_and_their_launch_command(name, task, n_split):
    cfg = load_config(name)
    pc, dc = cfg.protocol, cfg.protocol.distill
    assert cfg.task.name == task and cfg.task.n_train == n_split
    poe = [d.strength for d in pc.defenses if d.name == "poe"]
    ads = [d.strength for d in pc.defenses if d.name == "ads"]
    assert poe and all(0.6 <= g <= 0.75 for g in poe) and ads == [0.05]
    assert pc.temperature == 0.6 and cfg.sample.top_p == 0.95
    assert dc.finetune == "lora" and dc.lora.rank == dc.lora.alpha == 128 and dc.lr == 5e-4
    assert set(dc.lora.targets) == {"wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd", "w_gate_df", "w_up_df", "w_down_fd"}
    assert dc.steps * dc.batch_size == pytest.approx(3 * pc.n_traces, abs=dc.batch_size)  # 3 epochs
    assert pc.n_traces <= n_split - cfg.task.n_heldout  # one trace per training problem at most
    assert dc.attacks == () and pc.expose_k == 0 and not cfg.run.equilibrium  # across vocabularies
    for role in ("teacher", "proxy", "student"):
        rc = cfg.role(role)
        assert rc.hf_dir.startswith("gs://") and rc.model.param_dtype == rc.model.compute_dtype == "bfloat16"
    assert cfg.task.tokenizer == f"{cfg.teacher.hf_dir}/tokenizer.json"
    # The header's launch command names this config and a slice the mesh fits exactly.
    header = (CONFIG_DIR / f"{name}.yaml").read_text().split("\n\n")[0]
    command = re.search(r"python -m launch\.tpu job .*?--accelerator (\S+).*?-- protocol --config (\S+)", header, re.S)
    assert command and command.group(2) == name
    slice_ = ACCELERATORS[command.group(1)]
    check_mesh_fits(cfg.mesh, slice_, where=name)
    assert f"compile-check --config {name} --topology {command.group(1)}" in header
    assert (
        cfg.sample.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0
        and dc.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0
    )


def test_row_chunks_cover_every_row_once_in_batch_divisor_multiples():
    mesh = make_mesh(load_config("ci"))  # data=8: chunks are multiples of 8
    slices, size = row_chunks(21, 12, mesh)
    assert size == 8 and [(s.start, s.stop) for s in slices] == [(0, 8), (8, 16), (16, 21)]
    assert row_chunks(5, 1, mesh)[1] == 8  # never below the divisor


def test_chunked_proxy_gradient_equals_the_one_shot_gradient():
    cfg = load_config("ci")
    mesh = make_mesh(cfg)
    model = init_role_model(cfg.proxy, 56, mesh, cfg.rules, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 56, (21, 12)).astype(np.int32)
    mask = (rng.random((21, 12)) < 0.6).astype(np.float32)
    mask[3] = 0.0  # a row with no target: weighs nothing
    one_shot = jax.grad(lambda p: masked_nll(model.graphdef, p, jnp.asarray(tokens), jnp.asarray(mask)))(model.params)
    chunked = mean_nll_grad(model.graphdef, model.params, tokens, mask, mesh, chunk=8)
    for a, b in zip(jax.tree.leaves(one_shot), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)


def test_distillation_rows_are_split_over_the_batch_axes_when_they_divide():
    mesh = make_mesh(load_config("ci", ["mesh.data=4", "mesh.fsdp=2"]))
    arrays = {"tokens_bt": np.zeros((3, 16, 5), np.int32), "weights_b": np.ones((3, 16), np.float32)}
    placed = seed_rows_sharded(arrays, mesh)
    assert placed["tokens_bt"].sharding.spec == PartitionSpec(None, ("data", "fsdp"), None)
    assert placed["weights_b"].sharding.spec == PartitionSpec(None, ("data", "fsdp"))
    assert placed["tokens_bt"].addressable_shards[0].data.shape == (3, 2, 5)
    odd = {"tokens_bt": np.zeros((3, 12, 5), np.int32)}  # 12 rows do not split over 8 devices
    assert seed_rows_sharded(odd, mesh)["tokens_bt"] is odd["tokens_bt"]


@pytest.mark.parametrize("batch, processes", [(8, 1), (8, 2), (16, 4), (24, 8)])
def test_each_process_encodes_only_its_rows_of_every_decode_batch(batch, processes):
    """decode_problems' split: process i takes rows [i*B/n, (i+1)*B/n) of each batch (its devices' rows in the
    process-major mesh); over the processes every row of the padded batch is taken exactly once."""
    n_problems = 2 * batch + 3  # the last batch is short (padded with copies of its first prompt)
    for start in range(0, n_problems, batch):
        taken = []
        for i in range(processes):
            rows = local_rows(start, batch, n_problems, i, processes)
            assert len(rows) == batch // processes
            taken += list(rows)
        real = list(range(start, min(start + batch, n_problems)))
        assert taken[: len(real)] == real and all(r == start for r in taken[len(real) :])


def test_bench_benchmarks_an_hf_role_at_its_checkpoints_architecture(tmp_path, capsys, tokenizer):
    import json

    from experiments.bench import with_hf_architectures
    from experiments.cli import main as distgame
    from models import hf_export
    from models import transformer as tfm

    paper = with_hf_architectures(load_config("gsm8k_paper_tpu"))  # placeholder bucket: the published configs
    assert (paper.teacher.model.d_model, paper.teacher.model.n_layers, paper.teacher.model.d_ff) == (3584, 28, 18944)
    assert paper.student.model.rope_scaling_factor == 32.0 and paper.proxy.model.vocab_rows == 152064
    assert paper.teacher.model.param_dtype == "bfloat16"

    arch = tfm.ModelConfig(
        d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, scale_tied_logits=False, vocab_rows=64
    )
    _, params = tfm.split_params(tfm.build(arch, tokenizer.vocab_size, 0))
    hf_dir = hf_export.export_hf(jax.device_get(params), arch, tmp_path / "llama", "llama")
    over = [
        "bench.iters=1",
        "bench.rounds=1",
        "bench.distill_steps=1",
        f"teacher.hf_dir={hf_dir}",
        f"run_dir={tmp_path}",
        "proxy.model.vocab_rows=64",
    ]  # PoE decoding: one vocabulary
    assert distgame(["bench", "--config", "ci", "--json", "--no-progress", *over]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        report["params"]
        == tfm.param_count(params)
        != tfm.param_count(tfm.split_params(tfm.build(load_config("ci").teacher.model, tokenizer.vocab_size, 0))[1])
    )


def test_compile_check_reports_a_step_that_does_not_fit_instead_of_crashing():
    from launch.compile_check import _out_of_memory, format_report

    error = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(105.11G) exceeds available HBM (30.75G)."
    )
    row = _out_of_memory("proxy", error)
    assert row["fits"] is False and row["temp_bytes_needed"] == int(105.11 * 2**30)
    assert _out_of_memory("proxy", RuntimeError("INVALID_ARGUMENT: something else")) is None  # other errors propagate
    report = {
        "config": "x",
        "accelerator": "v4-32",
        "topology": "v4:2x2x4",
        "devices": 16,
        "device_kind": "TPU v4",
        "hosts": 4,
        "mesh": {"data": 8},
        "hbm_bytes_per_device": 32 * 2**30,
        "roles": [row],
    }
    line = format_report(report).splitlines()[1]
    assert line.startswith("  proxy    DOES NOT FIT: needs 105.1 GiB of temporaries (RESOURCE_EXHAUSTED")
