"""The gcloud commands the TPU launcher runs, as argument lists (never shell strings).

Locally nothing goes through a shell: each command is an argv list for
`subprocess.run`. On the workers, `gcloud ... ssh --command=SCRIPT` hands SCRIPT
to the worker's login shell, so every value that reaches a SCRIPT is passed
through `shlex.quote` here, and scripts are single lines so `--dry-run` prints
one command per line.

Worker layout (relative to the ssh user's home): the project in `distgame/`,
its virtualenv in `distgame-venv/`, each job's output in `distgame/logs/JOB.{log,pid,exit}`.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

from launch.accelerators import LaunchError, Slice

REMOTE_DIR = "distgame"
REMOTE_VENV = "distgame-venv"
REMOTE_ARCHIVE = "distgame.tar.gz"
UV = "~/.local/bin/uv"

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # Compute Engine resource names
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
_RUNTIME = re.compile(r"[a-z0-9][-a-z0-9.]*")
_JOB = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,62}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PYTHON = re.compile(r"3\.[0-9]+")
_RUN_DIR = re.compile(r"[A-Za-z0-9_.][-A-Za-z0-9_./]*")


def _check(pattern: re.Pattern, value: str, what: str, example: str) -> str:
    if not pattern.fullmatch(value):
        raise LaunchError(f"{what} {value!r} is not valid (expected something like {example!r})")
    return value


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU: its name (also the queued resource's and its node's), zone and project."""

    name: str
    zone: str
    project: str | None = None
    queued: bool = False

    def __post_init__(self):
        _check(_NAME, self.name, "--name", "my-tpu (lowercase letters, digits, '-', at most 63)")
        _check(_ZONE, self.zone, "--zone", "us-central2-b")
        if self.project is not None:
            _check(_PROJECT, self.project, "--project", "my-project-123")

    @property
    def flags(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create_commands(target: Target, slice_: Slice, runtime_version: str, provisioning: str) -> list[list[str]]:
    """Create the TPU VM, or the queued resource followed by the describe that is polled until ACTIVE."""
    _check(_RUNTIME, runtime_version, "--runtime-version", slice_.runtime_version)
    capacity = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[provisioning]
    if not target.queued:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "create",
                target.name,
                *target.flags,
                f"--accelerator-type={slice_.accelerator_type}",
                f"--version={runtime_version}",
                *capacity,
            ]
        ]
    return [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            target.name,
            *target.flags,
            f"--accelerator-type={slice_.accelerator_type}",
            f"--runtime-version={runtime_version}",
            f"--node-id={target.name}",
            *capacity,
        ],
        describe_command(target),
    ]


def describe_command(target: Target) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        target.name,
        *target.flags,
        "--format=value(state.state)",
    ]


def ssh(target: Target, worker: str, script: str) -> list[str]:
    assert "\n" not in script, "remote scripts are single lines"
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        target.name,
        f"--worker={worker}",
        *target.flags,
        f"--command={script}",
    ]


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """Ship the local checkout's committed HEAD (git archive) to every worker."""

    repo: str
    archive: str  # local path of the tarball

    def commands(self, target: Target) -> list[list[str]]:
        return [
            ["git", "-C", self.repo, "archive", "--format=tar.gz", f"--output={self.archive}", "HEAD"],
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                self.archive,
                f"{target.name}:{REMOTE_ARCHIVE}",
                "--worker=all",
                *target.flags,
            ],
        ]

    def unpack(self) -> str:
        return f"rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}"


@dataclasses.dataclass(frozen=True)
class GitSource:
    """Clone a repository URL at a ref on every worker."""

    url: str
    ref: str = "main"

    def __post_init__(self):
        for what, value in (("--git-url", self.url), ("--git-ref", self.ref)):
            if not value or value.startswith("-") or any(c in value for c in "\n\r\0"):
                raise LaunchError(
                    f"{what} {value!r} is not valid (it may not be empty, start with '-' or contain newlines)"
                )

    def commands(self, target: Target) -> list[list[str]]:
        return []

    def unpack(self) -> str:
        return (
            f"rm -rf {REMOTE_DIR} && git clone --quiet -- {shlex.quote(self.url)} {REMOTE_DIR} && "
            f"git -C {REMOTE_DIR} checkout --quiet {shlex.quote(self.ref)}"
        )


def install_commands(target: Target, source: LocalSource | GitSource, python: str = "3.11") -> list[list[str]]:
    """Put the project on every worker and `pip install -e .[tpu]` it into a fresh virtualenv.

    TPU VM images ship an older system Python than the project needs, so uv
    (installed with the system pip) provides the interpreter and the venv.
    """
    _check(_PYTHON, python, "--python", "3.11")
    script = " && ".join(
        [
            "set -euo pipefail",
            source.unpack(),
            "python3 -m pip install --user --quiet --upgrade uv",
            f"rm -rf {REMOTE_VENV}",
            f"{UV} venv --quiet --python {python} {REMOTE_VENV}",
            f"cd {REMOTE_DIR}",
            f"{UV} pip install --quiet --python ../{REMOTE_VENV}/bin/python -e '.[tpu]'",
            f"../{REMOTE_VENV}/bin/distgame --help > /dev/null",
        ]
    )
    return [*source.commands(target), ssh(target, "all", script)]


def check_job(job: str) -> str:
    return _check(_JOB, job, "--job", "protocol")


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r} must look like KEY=VALUE")
        env[_check(_ENV_KEY, key, "--env name", "DISTGAME_FOO")] = value
    return env


def run_command(target: Target, job: str, distgame_args: list[str], env: dict[str, str]) -> list[str]:
    """Start `distgame ARGS` on every worker, detached (it survives the ssh session), output in logs/JOB.log.

    The job's exit status lands in logs/JOB.exit; logs_command waits on logs/JOB.pid.
    """
    check_job(job)
    assignments = [shlex.quote(f"{k}={v}") for k, v in {"PYTHONUNBUFFERED": "1", **env}.items()]
    program = " ".join(["env", *assignments, f"../{REMOTE_VENV}/bin/distgame", *map(shlex.quote, distgame_args)])
    inner = f"{program}; echo $? > logs/{job}.exit"
    script = (
        f"cd {REMOTE_DIR} && mkdir -p logs && rm -f logs/{job}.exit logs/{job}.pid && "
        f"{{ setsid nohup bash -c {shlex.quote(inner)} > logs/{job}.log 2>&1 < /dev/null & echo $! > logs/{job}.pid; }}"
    )
    return ssh(target, "all", script)


def logs_command(target: Target, job: str) -> list[str]:
    """Stream worker 0's (process 0's) log until the job ends; exit with the job's status."""
    check_job(job)
    script = (
        f"cd {REMOTE_DIR} && {{ test -f logs/{job}.pid || {{ echo 'no job {job} on worker 0' >&2; exit 2; }}; }} && "
        f'tail -n +1 -F --pid="$(cat logs/{job}.pid)" logs/{job}.log; '
        f'exit "$(cat logs/{job}.exit 2>/dev/null || echo 1)"'
    )
    return ssh(target, "0", script)


def fetch_command(target: Target, run_dir: str, dest: str) -> list[str]:
    """Copy the run directory to `dest` locally: from the bucket if it is a gs:// path, else from worker 0."""
    if run_dir.startswith("gs://"):
        return ["gcloud", "storage", "cp", "--recursive", run_dir.rstrip("/"), dest]
    # scp lets the worker's shell expand remote paths, so only plain relative paths are allowed here.
    if not _RUN_DIR.fullmatch(run_dir) or ".." in run_dir.split("/"):
        raise LaunchError(
            f"run_dir={run_dir!r}: fetch needs a plain path relative to the project "
            "(letters, digits, '_', '-', '.', '/') or a gs:// path"
        )
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        f"{target.name}:{REMOTE_DIR}/{run_dir.rstrip('/')}",
        dest,
        "--worker=0",
        *target.flags,
    ]


def delete_command(target: Target) -> list[str]:
    if target.queued:  # --force also deletes the node the queued resource created
        return [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            target.name,
            *target.flags,
            "--force",
            "--quiet",
        ]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", target.name, *target.flags, "--quiet"]
