"""Runs claimed fine-tune jobs and keeps the job store up to date.

Each serving worker owns one `JobManager`: a loop thread claims queued jobs (up to the global
`max_concurrent_jobs`, enforced inside the claim transaction) and starts one supervisor thread
per job. The supervisor has the job's backend (backends.py: a local child process in its own
process group, or a Ray job) run `python -m training.run --config ... --progress ...`, tails the
progress JSONL into the store, honours cancel requests (SIGTERM, SIGKILL after the grace
period), and sets the final state from the exit status and the last event. The database stays
the source of truth whichever backend runs the process. Nothing here imports torch or training.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from service.finetune.backends import BackendError, Launch, LocalProcess, killpg, make_backend
from service.finetune.settings import FinetuneSettings
from service.finetune.store import Job, JobStore, hostname, pid_alive, process_cmdline

log = logging.getLogger("tuneserve.finetune")

PROGRESS_KEYS = ("epoch", "epochs", "step", "steps", "train_loss", "val_accuracy", "val_loss", "eta_s")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path, lines: int = 8) -> str:
    """The last `lines` lines, reading backwards in blocks (a log can be large)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            position = handle.tell()
            data = b""
            while position > 0 and data.count(b"\n") <= lines:
                step = min(64 * 1024, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


class ProgressReader:
    """Reads complete JSON lines appended since the last call (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buffer = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        events = []
        for line in lines:
            if line.strip():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
        return events


class JobManager:
    def __init__(self, settings: Any = None):
        self.settings = FinetuneSettings.from_settings(settings)
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.settings.db_path)
        self.backend = make_backend(self.settings.job_backend, self.settings.ray_address)
        self.host = hostname()
        self.worker_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._jobs: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "JobManager":
        if self._loop is not None:
            return self
        self.store.register_worker(self.worker_id, self.host, os.getpid())
        self.recover()
        self._stop.clear()
        self._loop = threading.Thread(target=self._run_loop, name="finetune-jobs", daemon=True)
        self._loop.start()
        log.info("fine-tune jobs: worker %s, database %s", self.worker_id, self.settings.db_path)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; running jobs of this worker are ended and marked `interrupted` (resumable)."""
        if self._loop is None:
            return
        self._stop.set()
        self._wake.set()
        self._loop.join(timeout)
        with self._lock:
            threads = list(self._jobs.values())
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.grace_seconds + 10)
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self.store.unregister_worker(self.worker_id)
        self._loop = None

    def wake(self) -> None:
        """A job was submitted: claim now instead of at the next poll."""
        self._wake.set()

    @property
    def running_here(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    # -- recovery --------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Running jobs whose worker is gone → `interrupted`; a leftover child is ended."""
        recovered = []
        for job in self.store.orphaned_running(self.host, self.settings.stale_worker_seconds):
            if job.owner == self.worker_id:
                continue
            if job.pid and job.host == self.host and pid_alive(job.pid) and job.id in process_cmdline(job.pid):
                killpg(job.pid, signal.SIGTERM)
                threading.Timer(self.settings.grace_seconds, killpg, (job.pid, signal.SIGKILL)).start()
            self.backend.stop_orphan(job)
            reason = "the server worker running this job stopped; resume with POST /finetune/{id}/resume".format(id=job.id)
            if self.store.finish(job.id, "interrupted", owner=job.owner, error=reason):
                log.warning("job %s interrupted (worker %s is gone)", job.id, job.owner)
                recovered.append(job.id)
        return recovered

    # -- the loop --------------------------------------------------------------------------
    def _run_loop(self) -> None:
        last_recover = time.monotonic()
        while not self._stop.is_set():
            try:
                self.store.heartbeat(self.worker_id)
                if time.monotonic() - last_recover > 5:
                    self.recover()
                    last_recover = time.monotonic()
                while not self._stop.is_set() and len(self.running_here) < self.settings.max_concurrent_jobs:
                    job = self.store.claim(self.worker_id, self.host, self.settings.max_concurrent_jobs)
                    if job is None:
                        break
                    thread = threading.Thread(target=self._supervise, args=(job,), name=f"job-{job.id}", daemon=True)
                    with self._lock:
                        self._jobs[job.id] = thread
                    thread.start()
            except Exception:  # never let the loop die on a transient database error
                log.exception("fine-tune job loop")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    # -- one job ---------------------------------------------------------------------------
    def write_config(self, job: Job) -> Path:
        job_dir = Path(job.job_dir)
        config = dict(job.config)
        config["data"] = job.dataset_dir
        config["output_dir"] = str(job_dir / "output")
        path = job_dir / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def command(self, job: Job, config_path: Path, progress_path: Path) -> list[str]:
        command = [*self.settings.training_command, "--config", str(config_path), "--progress", str(progress_path)]
        if job.resume:
            command.append("--resume")
        return command

    def launch(self, job: Job) -> Launch:
        """One attempt of `job`, ready for the backend: config written, paths chosen, resources asked."""
        job_dir = Path(job.job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.write_config(job)
        progress_path = job_dir / f"progress-{job.attempts}.jsonl"
        device = str(job.config.get("device") or "auto")
        gpus = {"cpu": 0.0, "cuda": max(1.0, self.settings.ray_num_gpus)}.get(device, self.settings.ray_num_gpus)
        return Launch(
            job_id=job.id, attempt=job.attempts, command=self.command(job, config_path, progress_path),
            cwd=job_dir, log_path=job_dir / "train.log", env={"TUNESERVE_JOB_ID": job.id},
            num_cpus=self.settings.ray_num_cpus, num_gpus=gpus,
        )

    def _supervise(self, job: Job) -> None:
        try:
            self._run_job(job)
        except Exception as error:
            log.exception("job %s", job.id)
            self.store.finish(job.id, "failed", owner=self.worker_id, error=f"job supervisor error: {error}")
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
            self._wake.set()

    def _run_job(self, job: Job) -> None:
        settings = self.settings
        launch = self.launch(job)
        log_path = launch.log_path
        progress_path = launch.cwd / f"progress-{job.attempts}.jsonl"
        with log_path.open("ab") as log_file:
            log_file.write(f"\n=== attempt {job.attempts} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(launch.command)}\n".encode())
        try:
            process = self.backend.start(launch)
        except BackendError as error:
            self.store.finish(job.id, "failed", owner=self.worker_id, error=str(error))
            log.warning("job %s: %s", job.id, error)
            return
        if isinstance(process, LocalProcess):
            self.store.set_pid(job.id, process.pid)
        log.info("job %s: started %s (attempt %d)", job.id, process.label, job.attempts)

        reader = ProgressReader(progress_path)
        progress: dict[str, Any] = dict(job.progress or {}) if job.resume else {}
        phase = "starting"
        final: dict[str, Any] | None = None
        failed_event: dict[str, Any] | None = None
        cancel_at = None  # when we first noticed a cancel request
        term_sent = kill_sent = None
        why_stopped = None  # "cancel" | "shutdown"

        def consume() -> None:
            nonlocal phase, final, failed_event
            changed = False
            for event in reader.read():
                kind = event.get("event")
                if kind == "phase" and event.get("phase"):
                    phase = str(event["phase"])
                    changed = True
                elif kind in ("progress", "epoch"):
                    progress.update({k: event[k] for k in PROGRESS_KEYS if k in event})
                    if kind == "epoch":
                        progress["epochs_done"] = event.get("epoch")
                        progress.setdefault("history", []).append(
                            {k: event.get(k) for k in ("epoch", "train_loss", "val_accuracy", "val_loss")}
                        )
                    epochs, steps = progress.get("epochs"), progress.get("steps")
                    if epochs and steps and progress.get("epoch"):
                        step = progress.get("step") or 0
                        if kind == "epoch":
                            step = steps
                        done = (progress["epoch"] - 1) * steps + step
                        progress["percent"] = round(100.0 * min(1.0, done / (epochs * steps)), 1)
                    changed = True
                elif kind == "succeeded":
                    final = event
                elif kind == "failed":
                    failed_event = event
            if changed:
                progress["updated"] = time.time()
                self.store.update_progress(job.id, progress, phase)

        while True:
            returncode = process.poll()
            consume()
            if returncode is not None:
                break
            now = time.monotonic()
            if why_stopped is None:
                if self._stop.is_set():
                    why_stopped = "shutdown"
                elif self.store.cancel_requested(job.id):
                    why_stopped = "cancel"
                if why_stopped:
                    cancel_at = now
            if why_stopped and term_sent is None:
                # A publish in progress is let finish (briefly): the version is either fully
                # there or not at all, and the job then reports what really happened.
                if phase != "publishing" or now - cancel_at > settings.grace_seconds:
                    log.info("job %s: %s → stopping %s", job.id, why_stopped, process.label)
                    process.terminate()
                    term_sent = now
            elif term_sent is not None and kill_sent is None and now - term_sent > settings.grace_seconds:
                log.warning("job %s: still running %.0fs after SIGTERM → SIGKILL", job.id, settings.grace_seconds)
                process.kill()
                kill_sent = now
            time.sleep(min(settings.poll_seconds, 0.5))
        consume()
        process.finish()  # leftovers in the group (data loader workers); Ray: the last log lines
        if why_stopped is None and self._stop.is_set():
            why_stopped = "shutdown"  # the server is stopping and its supervisor may have signalled the child first

        state, model, evaluation, error = self._outcome(returncode, final, failed_event, why_stopped, kill_sent, log_path)
        if self.store.finish(job.id, state, owner=self.worker_id, model=model, eval=evaluation, error=error):
            log.info("job %s: %s%s", job.id, state, f" ({error})" if error else f" → {model}")
            if state == "succeeded":
                self._cleanup(job)
        else:
            log.warning("job %s: finished as %s but the store no longer had it running", job.id, state)

    @staticmethod
    def _cleanup(job: Job) -> None:
        """After success: drop the uploaded dataset copy and the trainer's checkpoints (the
        published version has its own checkpoint.pt); keep config, logs, progress and metrics."""
        job_dir = Path(job.job_dir)
        dataset = Path(job.dataset_dir)
        if dataset.resolve().is_relative_to((job_dir / "dataset").resolve()):
            shutil.rmtree(job_dir / "dataset", ignore_errors=True)
        output = job_dir / "output"
        for item in list(output.glob("*.pt")) + [output / "export", output / "staging"]:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)

    @staticmethod
    def _outcome(returncode, final, failed_event, why_stopped, kill_sent, log_path):
        if final is not None and final.get("model"):
            note = None
            if why_stopped == "cancel":
                note = "cancel arrived after the model version was published; it stays published"
            elif returncode != 0:
                note = f"training exited with {returncode} after publishing"
            return "succeeded", str(final["model"]), final.get("eval"), note
        if why_stopped == "shutdown":
            return "interrupted", None, None, "the server stopped during the job; resume with POST /finetune/<job_id>/resume"
        if why_stopped == "cancel":
            how = " (killed after the grace period)" if kill_sent else ""
            return "cancelled", None, None, f"cancelled on request{how}; no model version was published"
        if returncode in (143, -signal.SIGTERM, 130, -signal.SIGINT):
            # SIGTERM/SIGINT that this worker did not send: a server shutdown (BentoML's process
            # supervisor signals a worker's children) or the parent-death signal. Resumable.
            name = "SIGINT" if returncode in (130, -signal.SIGINT) else "SIGTERM"
            return "interrupted", None, None, (
                f"training process was stopped by {name} from outside the job (server shutdown?); "
                "resume with POST /finetune/<job_id>/resume"
            )
        if returncode is not None and returncode < 0:
            number = -returncode
            reason = f"training process was killed by signal {number} ({_signal_name(number)})"
            if number == signal.SIGKILL:
                reason += "; out of memory or killed by an operator?"
            return "failed", None, None, reason
        if failed_event is not None:
            return "failed", None, None, str(failed_event.get("reason") or f"training failed (exit code {returncode})")
        if returncode == 0:
            return "failed", None, None, "training exited 0 without reporting a published model"
        tail = _tail(log_path)
        return "failed", None, None, f"training exited with code {returncode}" + (f"; log ends with:\n{tail}" if tail else "")
