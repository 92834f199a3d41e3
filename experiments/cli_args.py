"""`distgame`'s command line: the parser and its commands (experiments/cli.py runs them; no import of launch/
here, so the TPU launcher can validate a distgame command with this parser without an import cycle).

    distgame train --role teacher --config default [key=value ...] [--json]
    distgame bench --config default [--compare-hf] [--json]
    distgame protocol --config default [--seeds N] [--json]
    distgame equilibrium --config default [--json]
    distgame calibrate --config default [--json]          # the game's J(γ) vs the protocol's students
    distgame run --config default                        # what `make run` does
    distgame config --config default [key=value ...]     # the resolved, documented config
    distgame compile-check --config tpu_v5e8 --topology v5e:2x4   # compile for a TPU slice, no TPU needed
    distgame launch ACTION ...                           # Cloud TPU launcher (python -m launch.tpu)
"""

from __future__ import annotations

import argparse

from experiments.config import ROLES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default", help="built-in config name (experiments/configs/NAME.yaml) or a path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. teacher.train.steps=100")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distgame", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) one role's model")
    train.add_argument("--role", required=True, choices=ROLES)
    _common(train)
    bench = sub.add_parser("bench", help="train-step, decode, PoE and distillation throughput, FLOPs and utilisation")
    bench.add_argument(
        "--compare-hf",
        action="store_true",
        help="also time the same shapes in PyTorch + transformers (the test extra), alternating, and report the ratios",
    )
    _common(bench)
    protocol = sub.add_parser("protocol", help="defended traces, passive/adaptive students, results table")
    protocol.add_argument("--seeds", type=int, default=None, help="override protocol.seeds")
    _common(protocol)
    equilibrium = sub.add_parser(
        "equilibrium", help="solve the PoE game for budgets x student tilts, with empirical checks"
    )
    _common(equilibrium)
    calibrate = sub.add_parser(
        "calibrate", help="the game's predicted J(gamma) vs the protocol's measured passive students"
    )
    _common(calibrate)
    run = sub.add_parser(
        "run", help="the main job: train what is missing, protocol, equilibrium sweep, one run directory"
    )
    _common(run)
    show = sub.add_parser("config", help="print the resolved config with the documentation of every field")
    _common(show)
    check = sub.add_parser(
        "compile-check",
        help="compile the sharded train step for a TPU topology (needs .[tpu]) and report memory per device",
    )
    check.add_argument(
        "--topology",
        required=True,
        help="TPU topology (v5e:2x4) or accelerator type (v5litepod-8, v4-32); 'local' = this machine's devices",
    )
    check.add_argument("--role", choices=ROLES, action="append", help="role(s) to compile (default: all three)")
    _common(check)
    sub.add_parser(
        "launch",
        add_help=False,
        help="Cloud TPU launcher: create, install, run, logs, fetch, delete, job (distgame launch ACTION --help)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and key=value overrides in any order (argparse alone stops collecting the
    overrides at the first option after them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    return args
