"""Peak host memory of `models.hf_loader.load_hf_model`, relative to the checkpoint size.

    python -m experiments.hf_load_memory /tmp/hf_mem_llama [LAYERS]

makes a random bf16 Llama there if the directory is empty (4 layers: 224 MiB, 12: 416 MiB).

Building the random checkpoint needs the `test` extra (torch + transformers); the
measurement runs in a fresh process without torch. On CPU the "devices" live in host
RAM, so the resident-set growth includes the loaded float32 params themselves; the
loader's own overhead is that growth minus the params' bytes (the peak is reset with
/proc/self/clear_refs right before loading, so Linux only). tracemalloc sees only
the host-side numpy buffers the loader allocates (the transient, one-tensor copies).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

MEASURE = r"""
import json, os, sys, time, tracemalloc
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
from models import hf_loader, transformer as tfm
from models.sharding import MeshConfig, make_mesh
mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))  # no data axis: replicas would double the device bytes
jax.block_until_ready(jax.numpy.zeros(8) + 1)
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base_kb = status_kb("VmRSS")
base_anon_kb, base_file_kb = status_kb("RssAnon"), status_kb("RssFile")
import threading
peak = {"anon": 0, "file": 0}
stop = threading.Event()
def poll():  # the kernel keeps no peak per kind; sample it
    while not stop.is_set():
        peak["anon"] = max(peak["anon"], status_kb("RssAnon"))
        peak["file"] = max(peak["file"], status_kb("RssFile"))
        time.sleep(0.002)
poller = threading.Thread(target=poll, daemon=True)
poller.start()
tracemalloc.start()
t0 = time.perf_counter()
loaded = hf_loader.load_hf_model(sys.argv[1], mesh)
jax.block_until_ready(loaded.params)
seconds = time.perf_counter() - t0
_, traced_peak = tracemalloc.get_traced_memory()
peak_kb = status_kb("VmHWM")
stop.set(); poller.join()
print(json.dumps(dict(
    rss_growth_bytes=(peak_kb - base_kb) * 1024,
    numpy_peak_bytes=traced_peak,
    params_bytes=sum(s.data.nbytes for x in jax.tree.leaves(loaded.params) for s in x.addressable_shards),
    largest_param_bytes=max(x.nbytes for x in jax.tree.leaves(loaded.params)),
    anon_growth_bytes=(peak["anon"] - base_anon_kb) * 1024,
    file_mapped_peak_bytes=(peak["file"] - base_file_kb) * 1024,
    seconds=round(seconds, 2),
)))
"""


def make_checkpoint(directory: pathlib.Path, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0")).save(
        str(directory / "tokenizer.json")
    )


def main(argv: list[str]) -> None:
    directory = pathlib.Path(argv[0] if argv else "/tmp/hf_mem_llama")
    if not (directory / "config.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        make_checkpoint(directory, int(argv[1]) if len(argv) > 1 else 4)
    ckpt_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(directory)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    if out.returncode:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 2**20
    print(f"checkpoint (safetensors, bf16)    {ckpt_bytes / mb:8.1f} MiB")
    print(f"params on the 8 devices (float32) {r['params_bytes'] / mb:8.1f} MiB")
    print(
        f"peak RSS growth while loading     {r['rss_growth_bytes'] / mb:8.1f} MiB  = {r['rss_growth_bytes'] / ckpt_bytes:.2f}x checkpoint"
    )
    over = r["rss_growth_bytes"] - r["params_bytes"]
    print(f"  of which loader overhead        {over / mb:8.1f} MiB  = {over / ckpt_bytes:.2f}x checkpoint")
    anon = r["anon_growth_bytes"] - r["params_bytes"]
    print(f"peak anonymous-memory growth      {r['anon_growth_bytes'] / mb:8.1f} MiB  (sampled every 2 ms)")
    print(f"  minus the params                {anon / mb:8.1f} MiB  = {anon / ckpt_bytes:.2f}x checkpoint")
    print(f"peak file-backed RSS growth       {r['file_mapped_peak_bytes'] / mb:8.1f} MiB  (page cache, reclaimable)")
    print(
        f"peak numpy buffers (tracemalloc)  {r['numpy_peak_bytes'] / mb:8.1f} MiB  = {r['numpy_peak_bytes'] / ckpt_bytes:.2f}x checkpoint"
    )
    print(f"largest single param (float32)    {r['largest_param_bytes'] / mb:8.1f} MiB")
    print(f"load time                         {r['seconds']:8.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
