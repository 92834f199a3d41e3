"""`distgame run` (what `make run` calls): train the three models if their checkpoints are
missing, run the protocol (run.protocol_seeds seeds), run the equilibrium sweep, and
write everything into one run directory with a short summary."""

from __future__ import annotations

import os
import time

from experiments import io as rio
from experiments.config import Config
from experiments.distributed import is_main_process
from experiments.equilibrium import EquilibriumSweep
from experiments.equilibrium_report import equilibrium_markdown
from experiments.protocol import Protocol, ensure_models, results_markdown
from experiments.train import make_mesh


def main_job(cfg: Config, progress: bool = True) -> dict:
    start = time.perf_counter()
    run_dir = rio.path(cfg.run_dir)
    ensure_models(cfg, make_mesh(cfg), progress)
    trained = time.perf_counter() - start
    results = Protocol(cfg, progress=progress, seeds=cfg.run.protocol_seeds).run()
    text = results_markdown(results)
    summary = {
        "run_dir": str(run_dir if rio.is_remote(run_dir) else run_dir.absolute()),
        "results": str(run_dir / "RESULTS.md"),
        "protocol_seconds": results["seconds"],
        "models_seconds": round(trained, 1),
    }
    if cfg.run.equilibrium:
        eq = EquilibriumSweep(cfg, progress=progress).run()
        text += "\n" + equilibrium_markdown(eq)
        summary.update(equilibrium_seconds=eq["seconds"], plots=eq["plots"])
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if not is_main_process():  # every process holds the same results; process 0 writes and reports them
        return summary
    rio.write_text(run_dir / "RESULTS.md", text)
    print(text)
    print(f"Run directory: {summary['run_dir']}")
    print(f"  RESULTS.md            the results table{' and the equilibrium table' if cfg.run.equilibrium else ''}")
    print("  teacher_vs_student.png  teacher vs student accuracy per defense")
    for p in summary.get("plots", []):
        print(f"  {os.path.basename(p):<22}  equilibrium plot")
    print(f"Finished in {summary['seconds']:.0f}s.")
    return summary
