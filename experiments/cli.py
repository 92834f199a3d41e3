"""`distgame`: the command-line entry point: runs the command that experiments.cli_args parsed (usage there).
A user's mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import pathlib
import sys

from experiments import io as rio
from experiments import preemption
from experiments.cli_args import parse_args
from experiments.config import ROLES, ConfigError, describe, load_config
from experiments.distributed import (
    CoordinatorError,
    cpu_devices_per_core,
    initialize_distributed,
    is_main_process,
    keep_off_absent_tpu,
)
from experiments.tasks.task_config import TaskError
from experiments.tasks.text_tokenizers import TokenizerError
from game.solver import SolverDivergedError
from models.checkpoint import CheckpointError
from models.hf_config import HFLoadError

USER_ERRORS = (ConfigError, CheckpointError, TaskError, TokenizerError, CoordinatorError, HFLoadError)


def _train(args, cfg) -> dict:
    from experiments.train import Trainer, make_mesh

    if cfg.role(args.role).hf_dir:
        raise ConfigError(
            f"{args.role}.hf_dir is set: that role is loaded from its checkpoint, not trained; "
            f"set {args.role}.hf_dir='' to train it from scratch"
        )
    trainer = Trainer(cfg, args.role, make_mesh(cfg))
    summary = trainer.fit(progress=not args.no_progress)
    if is_main_process():
        print(
            f"{args.role}: test accuracy {summary['test_accuracy']:.3f} on {summary['n_test']} problems "
            f"after {summary['steps']} steps in {summary['seconds']:.1f}s; checkpoint {summary['checkpoint']}"
        )
    return summary


def _bench(args, cfg) -> dict:
    from experiments.bench import format_report, run_bench

    report = run_bench(cfg, compare_hf=args.compare_hf)
    print(format_report(report))
    return report


def _protocol(args, cfg) -> dict:
    from experiments.protocol import Protocol

    results = Protocol(cfg, progress=not args.no_progress, seeds=args.seeds).run()
    if is_main_process():
        print(rio.read_text(rio.path(cfg.run_dir) / "RESULTS.md"))
    summary = {
        "results": str(rio.path(cfg.run_dir) / "results.json"),
        "seconds": results["seconds"],
        "rows": len(results["rows"]),
        **results["headline"],
    }
    if "ablation" in results:  # attacker ablation (experiments/attacker.py): per defense, paired points vs passive
        from experiments.ablation_report import compact

        summary["ablation"] = compact(results["ablation"])
    return summary


def _equilibrium(args, cfg) -> dict:
    from experiments.equilibrium import EquilibriumSweep

    eq = EquilibriumSweep(cfg, progress=not args.no_progress).run()
    if is_main_process():
        print(rio.read_text(rio.path(cfg.run_dir) / "equilibrium" / "EQUILIBRIUM.md"))
    from experiments.equilibrium_report import SUMMARY_KEYS

    return {
        "equilibrium": str(rio.path(cfg.run_dir) / "equilibrium" / "equilibrium.json"),
        "seconds": eq["seconds"],
        "plots": eq["plots"],
        "converged": all(p["converged"] for p in eq["points"]),
        **{k: eq[k] for k in SUMMARY_KEYS if k in eq},
    }


def _calibrate(args, cfg) -> dict:
    from experiments.calibrate import Calibration, calibration_markdown

    result = Calibration(cfg, progress=not args.no_progress).run()
    if is_main_process():
        print(calibration_markdown(result))

    def finite(x):  # NaN -> null: the last line stays strict JSON
        return x if x == x else None

    return {
        "calibration": str(rio.path(cfg.run_dir) / "calibration" / "calibration.json"),
        "spearman": finite(result["spearman"]),
        "sign_agreement": finite(result["sign_agreement"]),
        "spearman_accuracy": finite(result["spearman_accuracy"]),
        "seconds": result["seconds"],
        "plots": result.get("plots", []),
    }


def _run(args, cfg) -> dict:
    from experiments.run import main_job

    return main_job(cfg, progress=not args.no_progress)


def _compile_check(args, cfg) -> dict:
    from launch.compile_check import format_report, run_compile_check

    report = run_compile_check(cfg, args.topology, tuple(args.role or ROLES))
    print(format_report(report))
    return report


def enable_compilation_cache() -> str | None:
    """Keep compiled XLA programs on disk so a repeated command skips recompiling its steps and samplers:
    $DISTGAME_COMPILATION_CACHE, default ~/.cache/distgame/jax; set it to '' to turn this off. A cache
    directory the user already gave jax (JAX_COMPILATION_CACHE_DIR) wins. Programs that compiled in under
    $DISTGAME_COMPILATION_CACHE_MIN_S seconds (default 1) are not kept: a disk read is not worth it for them,
    except in the test suite, whose many small commands recompile the same tiny programs."""
    import jax

    path = os.environ.get("DISTGAME_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "distgame" / "jax"))
    if not path or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir or None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(os.environ.get("DISTGAME_COMPILATION_CACHE_MIN_S", "1.0"))
    )
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # the launcher has its own parser; everything after `launch` is its
        from launch.tpu import main as launch_main

        return launch_main(argv[1:], prog="distgame launch")
    args = parse_args(argv)
    # Orbax logs its own tracebacks through absl; we report those failures as one line instead.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(describe(cfg))
            return 0
        # Before anything touches a jax backend: pick the platform, join the other processes (if any).
        keep_off_absent_tpu()
        cpu_devices_per_core()
        enable_compilation_cache()
        initialize_distributed(cfg.distributed)
        command = {
            "train": _train,
            "bench": _bench,
            "protocol": _protocol,
            "equilibrium": _equilibrium,
            "calibrate": _calibrate,
            "run": _run,
            "compile-check": _compile_check,
        }[args.command]
        with preemption.watch_sigterm():
            summary = command(args, cfg)
    except (*USER_ERRORS, SolverDivergedError) as e:
        print(f"distgame {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (
        FloatingPointError
    ) as e:  # a training or distillation loss became NaN/inf: the message names role, step, quantity
        kept = "checkpoints of earlier steps are kept" if args.command == "train" else "finished stages are kept"
        print(f"distgame {args.command}: diverged: {e} ({kept})", file=sys.stderr)
        return 2
    except preemption.Preempted as e:
        print(f"distgame {args.command}: {e}; re-run the same command to resume", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(f"distgame {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if args.json and is_main_process():
        print(rio.to_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
