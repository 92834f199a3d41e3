"""Run distgame on a Cloud TPU slice: `python -m launch.tpu ACTION ...` (also `distgame launch ACTION ...`).

    python -m launch.tpu job --name my-run --accelerator v5litepod-8 --zone us-west4-a --project my-project \\
        [--spot | --reserved] [--queued] [--delete] [--dry-run] -- protocol --config tpu_v5e8 [key=value ...]

Actions: create (TPU VM, or queued resource + wait until ACTIVE), install (ship
the project to every worker, pip install -e .[tpu]), run (start the distgame
command after `--` on every worker, detached), logs (stream worker 0's log until
the job ends; exit with its status), fetch (copy the run directory back),
delete, and job (all of these in order; with --delete the TPU is deleted at the
end even if a step failed, but not on Ctrl-C). --dry-run prints the gcloud commands, one per line,
and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

from experiments.config import ConfigError, load_config
from launch import gcloud
from launch.accelerators import LaunchError, check_mesh_fits, lookup

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ACTIONS = ("create", "install", "run", "logs", "fetch", "delete", "job")
NEEDS_DISTGAME_ARGS = ("run", "fetch", "job")


class StepFailed(RuntimeError):
    pass


def build_parser(prog: str = "python -m launch.tpu") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ACTIONS:
        p = sub.add_parser(action, help=f"{action} (see the module docstring)")
        p.add_argument("--name", required=True, help="TPU name (also the queued resource's); lowercase, digits, '-'")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)")
        p.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's configured project)")
        p.add_argument(
            "--queued", action="store_true", help="use a queued resource (waits for capacity) instead of a TPU VM"
        )
        p.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")
        if action in ("create", "run", "job"):
            p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5litepod-8, v4-32, v5p-64")
        if action in ("create", "job"):
            p.add_argument(
                "--runtime-version", default=None, help="TPU software version (default: the table's for the generation)"
            )
            capacity = p.add_mutually_exclusive_group()
            capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted)")
            capacity.add_argument("--reserved", action="store_true", help="use the project's reservation")
            p.add_argument("--wait-minutes", type=float, default=180.0, help="queued resource: give up after this long")
        if action in ("install", "job"):
            p.add_argument(
                "--git-url",
                default=None,
                help="clone this repository on the workers instead of copying the local checkout",
            )
            p.add_argument("--git-ref", default="main", help="branch, tag or commit to check out with --git-url")
            p.add_argument(
                "--repo",
                default=str(REPO_ROOT),
                help="local checkout whose committed HEAD is copied (without --git-url)",
            )
            p.add_argument("--python", default="3.11", help="Python version of the workers' virtualenv")
        if action in ("run", "logs", "job"):
            p.add_argument(
                "--job",
                default=None,
                help="job name for logs/JOB.log on the workers (default: the distgame subcommand)",
            )
        if action in ("run", "job"):
            p.add_argument(
                "--env",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="extra environment for distgame (repeatable)",
            )
        if action in ("fetch", "job"):
            p.add_argument(
                "--to", default=None, help="local destination directory (default: the run_dir's parent, e.g. runs)"
            )
        if action == "job":
            p.add_argument("--delete", action="store_true", help="delete the TPU at the end, even if a step failed")
    return parser


def parse_distgame_args(args: list[str]):
    """Validate the distgame command with distgame's own parser and load its config (one-line errors)."""
    from experiments.cli_args import parse_args as parse_distgame

    if not args:
        raise LaunchError("give the distgame command after '--', e.g. -- protocol --config tpu_v5e8")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            ns = parse_distgame(args)
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            raise LaunchError(f"distgame command {shlex.join(args)!r}: {lines[-1] if lines else 'invalid'}") from None
    if ns.command == "config" or not hasattr(ns, "config"):
        raise LaunchError(f"distgame {ns.command} is not a job to run on a TPU")
    cfg = load_config(ns.config, ns.overrides)
    if hasattr(ns, "no_progress") and not ns.no_progress:
        args = [*args, "--no-progress"]  # progress bars do not belong in a log file
    return ns, cfg, args


def check_fits(cfg, slice_) -> None:
    data, fsdp, _ = check_mesh_fits(cfg.mesh, slice_, where=f"config {cfg.name!r}: mesh")
    for role in ("teacher", "proxy", "student"):
        bs = cfg.role(role).train.batch_size
        if bs % (data * fsdp):
            raise LaunchError(
                f"config {cfg.name!r}: {role}.train.batch_size={bs} is not divisible by data*fsdp = {data * fsdp} on {slice_.accelerator_type}"
            )


def plan(opts, distgame_args: list[str]) -> list[tuple[str, list[str]]]:
    """The (kind, argv) steps of one action; kind says how a real run treats the step."""
    target = gcloud.Target(opts.name, opts.zone, opts.project, opts.queued)
    action = opts.action
    slice_ = lookup(opts.accelerator) if hasattr(opts, "accelerator") else None
    cfg, job = None, getattr(opts, "job", None)
    if action in NEEDS_DISTGAME_ARGS or distgame_args:
        ns, cfg, distgame_args = parse_distgame_args(distgame_args)
        job = job or ns.command
        if slice_ is not None:
            check_fits(cfg, slice_)
    if action in ("logs",) and job is None:
        raise LaunchError(
            "logs needs --job (the distgame subcommand the job ran, e.g. protocol) or the command after '--'"
        )
    steps: list[tuple[str, list[str]]] = []
    if action in ("create", "job"):
        provisioning = "spot" if opts.spot else "reserved" if opts.reserved else "on-demand"
        cmds = gcloud.create_commands(target, slice_, opts.runtime_version or slice_.runtime_version, provisioning)
        steps.append(("do", cmds[0]))
        steps += [("wait", c) for c in cmds[1:]]
    if action in ("install", "job"):
        if opts.git_url:
            source = gcloud.GitSource(opts.git_url, opts.git_ref)
        else:
            source = gcloud.LocalSource(opts.repo, os.path.join(tempfile.gettempdir(), f"distgame-{opts.name}.tar.gz"))
        steps += [("do", c) for c in gcloud.install_commands(target, source, opts.python)]
    if action in ("run", "job"):
        steps.append(("do", gcloud.run_command(target, job, distgame_args, gcloud.parse_env(opts.env))))
    if action in ("logs", "job"):
        steps.append(("status", gcloud.logs_command(target, job)))
    if action in ("fetch", "job"):
        # By default the run directory lands at the same relative path here: runs/NAME (gs://bucket/runs/NAME too).
        relative = (
            cfg.run_dir.removeprefix("gs://").split("/", 1)[-1] if cfg.run_dir.startswith("gs://") else cfg.run_dir
        )
        dest = opts.to or str(pathlib.PurePosixPath(relative.rstrip("/")).parent)
        steps += [("do", ["mkdir", "-p", dest]), ("fetch", gcloud.fetch_command(target, cfg.run_dir, dest))]
    if action == "delete" or (action == "job" and opts.delete):
        steps.append(("cleanup", gcloud.delete_command(target)))
    return steps


def _wait_active(argv: list[str], minutes: float) -> None:
    deadline, last = time.monotonic() + 60 * minutes, None
    while True:
        out = subprocess.run(argv, capture_output=True, text=True)
        state = out.stdout.strip() or f"describe failed: {out.stderr.strip()[:200]}"
        if state != last:
            print(f"launch: queued resource state: {state}", file=sys.stderr)
            last = state
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise StepFailed(f"queued resource is {state}; see `{shlex.join(argv[:-1])}`")
        if time.monotonic() > deadline:
            raise StepFailed(f"queued resource not ACTIVE after {minutes:g} minutes (last state {state})")
        time.sleep(30)


def execute(steps, opts) -> int:
    """Run the steps; the cleanup step runs even if an earlier one failed. Returns the exit status.

    Ctrl-C is the exception: it stops the launcher (and log streaming) but leaves the TPU and its
    job running, and says how to delete it."""
    status = 0
    cleanup = [argv for kind, argv in steps if kind == "cleanup"]
    try:
        for kind, argv in steps:
            if kind == "cleanup":
                continue
            print(f"launch: {shlex.join(argv)[:160]}", file=sys.stderr)
            if kind == "wait":
                _wait_active(argv, opts.wait_minutes)
                continue
            rc = subprocess.run(argv).returncode
            if kind == "status":
                status = rc
                if rc:
                    print(f"launch: the job exited with status {rc}", file=sys.stderr)
            elif rc and kind == "fetch":
                print(f"launch: error: fetching the results failed (exit status {rc})", file=sys.stderr)
                status = status or 1
            elif rc:
                raise StepFailed(f"`{shlex.join(argv)[:200]}` failed with exit status {rc}")
    except StepFailed as e:
        print(f"launch: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        hint = f"; delete it with: {shlex.join(cleanup[0])}" if cleanup else ""
        print(f"launch: interrupted; the TPU and any started job keep running{hint}", file=sys.stderr)
        return 130
    for argv in cleanup:
        print(f"launch: {shlex.join(argv)}", file=sys.stderr)
        if subprocess.run(argv).returncode:
            print(f"launch: error: deleting failed; delete by hand: {shlex.join(argv)}", file=sys.stderr)
            status = status or 1
    return status


def _warn_uncommitted(steps) -> None:
    for _, argv in steps:
        if argv[:1] == ["git"]:
            out = subprocess.run(
                ["git", "-C", argv[2], "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
            )
            if out.stdout.strip():
                print(
                    "launch: warning: uncommitted changes are not shipped (the workers get the committed HEAD)",
                    file=sys.stderr,
                )


def main(argv: list[str] | None = None, prog: str = "python -m launch.tpu") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = build_parser(prog).parse_args(argv[:split])
    try:
        steps = plan(opts, argv[split + 1 :])
    except ConfigError as e:  # LaunchError included
        print(f"launch {opts.action}: error: {e}", file=sys.stderr)
        return 2
    if opts.dry_run:
        print("\n".join(shlex.join(argv) for _, argv in steps))
        return 0
    _warn_uncommitted(steps)
    return execute(steps, opts)


if __name__ == "__main__":
    sys.exit(main())
