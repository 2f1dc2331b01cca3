"""Where a fine-tune job's training process runs: a local child process, or a Ray cluster.

The job runner (runner.py) owns the job: the database row, progress, cancel, the outcome. A
backend only starts the training command and then answers four questions about it: has it
ended (and with which exit code), stop it politely, stop it now, clean up. So the state
machine, the exactly-once claim (a database transaction), cancel and resume are the same
whichever backend runs the process.

- `local`: `python launch.py PARENT -- COMMAND` in its own process group (the launcher makes the
  kernel end it when the serving worker dies).
- `ray`: the same command as a Ray job (Job Submission API, `ray.job_submission`), with the
  job's CPUs/GPUs as entrypoint resources. The submission id is derived from the job id and its
  attempt, so Ray itself refuses a second submission of the same attempt, and a worker that
  finds the job orphaned can stop it without any extra state. `ray` is imported only here, and
  only when this backend is chosen: the service stays free of it otherwise.

Both backends need the job folder (dataset, config, progress file, checkpoints) and the model
store at the same paths on the serving side and where training runs: on one machine that is
trivially so; on a Ray cluster it means a shared volume mounted at the same path on every node.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

log = logging.getLogger("tuneserve.finetune")

LAUNCHER = Path(__file__).with_name("launch.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("local", "ray", "none")
# Variables a Ray job gets from the serving side (the rest of its environment is the Ray node's).
FORWARDED_PREFIXES = ("TUNESERVE_", "BENTOML_")
NOT_FORWARDED = frozenset({"TUNESERVE_API_KEY", "TUNESERVE_API_KEYS"})


class BackendError(RuntimeError):
    """The backend could not start or follow a job (unreachable cluster, refused submission)."""


class RunningJob(Protocol):
    label: str  # "pid 1234" / "ray job tuneserve-ft-…-1", for logs

    def poll(self) -> int | None:
        """The exit code once the training process has ended, else None."""

    def terminate(self) -> None:
        """Ask the training process to stop (SIGTERM: it saves nothing and publishes nothing)."""

    def kill(self) -> None:
        """Stop it now."""

    def finish(self) -> None:
        """After poll() returned a code: end leftovers, bring the last log lines home."""


@dataclass(frozen=True)
class Launch:
    """One attempt of one job, as the runner prepared it."""

    job_id: str
    attempt: int
    command: list[str]  # the training command, without any launcher
    cwd: Path
    log_path: Path
    env: Mapping[str, str]  # additions to the environment
    num_cpus: float = 1.0
    num_gpus: float = 0.0


# What a job child inherits from the server: an allow-list, so API keys, cloud credentials and any
# other secret of the serving process never reach training code or its logs.
CHILD_VARIABLES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV",
                             "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES"})
CHILD_PREFIXES = ("LC_", "TUNESERVE_", "BENTOML_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH_", "ORT_")


def inherited(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` a job child may see (never TUNESERVE_API_KEY(S))."""
    return {key: value for key, value in environ.items()
            if (key in CHILD_VARIABLES or key.startswith(CHILD_PREFIXES)) and key not in NOT_FORWARDED}


def asked_for(environ: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The variables of `environ` named in TUNESERVE_JOB_ENVIRONMENT (names, or `PREFIX*`), for a
    job's `Launch.env` (so a Ray job gets them too); never TUNESERVE_API_KEY(S)."""
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    return {key: value for key, value in environ.items()
            if (key in exact or (prefixes and key.startswith(prefixes))) and key not in NOT_FORWARDED}


def child_environment(extra: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowed part of the serving process's environment plus `extra`, with the project root on
    PYTHONPATH (inside a bento the project is not pip-installed, so `-m training.run` needs it)."""
    environ = os.environ if environ is None else environ
    python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environ.get("PYTHONPATH")]))
    return {**inherited(environ), "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, **extra}


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- local child process ---------------------------------------------------------------------
class LocalProcess:
    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pid = process.pid
        self.label = f"pid {process.pid}"

    def poll(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        killpg(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        killpg(self.pid, signal.SIGKILL)

    def finish(self) -> None:
        killpg(self.pid, signal.SIGKILL)  # leftovers in the group (data loader workers)


class LocalBackend:
    name = "local"

    def start(self, launch: Launch) -> LocalProcess:
        command = [sys.executable, str(LAUNCHER), str(os.getpid()), "--", *launch.command]
        with launch.log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=child_environment(launch.env), cwd=str(launch.cwd),
            )
        return LocalProcess(process)

    def stop_orphan(self, job: Any) -> None:
        """Nothing to do: the runner ends a leftover local child itself (it knows the pid)."""


# -- Ray Job Submission ----------------------------------------------------------------------
def submission_id(job_id: str, attempt: int) -> str:
    return f"tuneserve-{job_id}-{attempt}"


def ray_entrypoint(launch: Launch) -> str:
    """A shell line for Ray: run in the job folder, replace the shell (signals reach Python)."""
    return f"cd {shlex.quote(str(launch.cwd))} && exec {shlex.join(launch.command)}"


def ray_env_vars(launch: Launch, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the Ray job inherits from the service: the store and job settings (never API keys),
    the project on PYTHONPATH, and the launch's own variables."""
    environ = os.environ if environ is None else environ
    env = {
        key: value for key, value in environ.items()
        if key.startswith(FORWARDED_PREFIXES) and key not in NOT_FORWARDED
    }
    python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environ.get("PYTHONPATH")]))
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, **launch.env}


class RayJob:
    """One submitted Ray job, followed through the Job Submission client."""

    # Ray's dashboard may restart or drop a request; a job is given up only after this long.
    UNREACHABLE_AFTER_S = 60.0
    LOG_EVERY_S = 2.0

    def __init__(self, client: Any, submission: str, log_path: Path):
        self.client = client
        self.submission = submission
        self.label = f"ray job {submission}"
        self.log_path = log_path
        self._log_chars = 0
        self._log_at = 0.0
        self._unreachable_since: float | None = None
        self._stopped = False

    def poll(self) -> int | None:
        try:
            info = self.client.get_job_info(self.submission)
        except Exception as error:  # a transient dashboard error must not fail the job at once
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since > self.UNREACHABLE_AFTER_S:
                raise BackendError(f"lost contact with the Ray cluster for {self.UNREACHABLE_AFTER_S:.0f}s: {error}") from error
            return None
        self._unreachable_since = None
        if time.monotonic() - self._log_at > self.LOG_EVERY_S:
            self._copy_logs()
        if not info.status.is_terminal():
            return None
        self._final_info = info
        return ray_exit_code(str(info.status), getattr(info, "driver_exit_code", None), self._stopped,
                             str(getattr(info, "error_type", None) or ""))

    def terminate(self) -> None:
        self._stopped = True
        try:
            self.client.stop_job(self.submission)  # Ray: SIGTERM, then SIGKILL after its own grace
        except Exception as error:
            log.warning("%s: stop failed: %s", self.label, error)

    def kill(self) -> None:
        self.terminate()

    def finish(self) -> None:
        self._copy_logs()
        info = getattr(self, "_final_info", None)
        if info is not None and info.message and str(info.status) != "SUCCEEDED":
            with self.log_path.open("a") as handle:
                handle.write(f"\n[ray] {info.status}: {info.message}\n")

    def _copy_logs(self) -> None:
        """Append what Ray captured since the last copy to the job's train.log."""
        self._log_at = time.monotonic()
        try:
            text = self.client.get_job_logs(self.submission)
        except Exception:
            return
        if len(text) > self._log_chars:
            with self.log_path.open("a") as handle:
                handle.write(text[self._log_chars:])
            self._log_chars = len(text)


# Ray's error type when the actor supervising the trainer died with its node (not the trainer's doing).
NODE_LOST_ERROR = "JOB_SUPERVISOR_ACTOR_DIED"


def ray_exit_code(status: str, driver_exit_code: int | None, stopped_by_us: bool, error_type: str = "") -> int:
    """A process-style exit code for a finished Ray job, so the runner judges it like a local one."""
    status = status.rsplit(".", 1)[-1].upper()
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        # stopped by this runner (cancel/shutdown) or by someone through Ray: a SIGTERM either way
        return -signal.SIGTERM
    if driver_exit_code is None and error_type.rsplit(".", 1)[-1].upper() == NODE_LOST_ERROR:
        # the node running the trainer was lost: like a local child whose host went down, the job
        # was stopped from outside (resumable on another node), not failed by its data or code
        return -signal.SIGTERM
    if driver_exit_code is not None:
        return int(driver_exit_code)
    return 1


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None, client: Any = None):
        self.address = address
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError as error:
                raise BackendError(
                    "TUNESERVE_JOB_BACKEND=ray needs the Ray client: pip install 'ray[default]'"
                ) from error
            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as error:
                raise BackendError(f"cannot reach the Ray cluster at {self.address or 'auto'}: {error}") from error
        return self._client

    def start(self, launch: Launch) -> RayJob:
        submission = submission_id(launch.job_id, launch.attempt)
        try:
            self.client.submit_job(
                entrypoint=ray_entrypoint(launch),
                submission_id=submission,
                runtime_env={"env_vars": ray_env_vars(launch)},
                entrypoint_num_cpus=launch.num_cpus,
                entrypoint_num_gpus=launch.num_gpus,
                metadata={"tuneserve_job": launch.job_id, "attempt": str(launch.attempt)},
            )
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(f"Ray refused job {submission}: {error}") from error
        with launch.log_path.open("a") as handle:
            handle.write(f"[ray] submitted {submission} to {self.address or 'auto'} "
                         f"(num_cpus={launch.num_cpus:g}, num_gpus={launch.num_gpus:g})\n")
        return RayJob(self.client, submission, launch.log_path)

    def stop_orphan(self, job: Any) -> None:
        """A running job whose serving worker is gone: stop its Ray job (it becomes `interrupted`)."""
        try:
            self.client.stop_job(submission_id(job.id, job.attempts))
        except Exception as error:
            log.warning("job %s: could not stop its Ray job: %s", job.id, error)


def make_backend(name: str, ray_address: str | None = None) -> LocalBackend | RayBackend:
    if name == "ray":
        return RayBackend(ray_address)
    if name == "local":
        return LocalBackend()
    raise ValueError(f"unknown job backend {name!r}; known: {', '.join(BACKENDS)}")


def unavailable_reason(name: str) -> str | None:
    """Why this server cannot run fine-tune jobs with backend `name` (→ 501), or None.

    Checked without importing anything heavy: a serve-only image has neither `training` nor
    torch, so the local backend cannot work there and the answer names the backend to configure.
    """
    how = "set TUNESERVE_JOB_BACKEND=ray and TUNESERVE_RAY_ADDRESS=http://<ray-head>:8265 to train on a Ray cluster"
    if name == "none":
        return f"fine-tune jobs are off on this server (TUNESERVE_JOB_BACKEND=none); {how}"
    if name == "local":
        missing = [module for module in ("training", "torch") if importlib.util.find_spec(module) is None]
        if missing:
            return (f"this is a serve-only server (no {' or '.join(missing)} installed), so it cannot train "
                    f"in a local child process; {how}")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        return "TUNESERVE_JOB_BACKEND=ray needs the Ray client in the serving image: pip install 'ray[default]'"
    return None
