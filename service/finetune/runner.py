"""Runs claimed fine-tune jobs and keeps the job store up to date.

Each serving worker owns one `JobManager`: a loop thread claims queued jobs (up to the global
`max_concurrent_jobs`, enforced inside the claim transaction) and starts one supervisor thread
per job. The supervisor has the job's backend (backends.py: a local child process in its own
process group, or a Ray job) run `python -m training.run --config ... --progress ...`, tails the
progress JSONL into the store (trace.py), honours cancel requests (SIGTERM, SIGKILL after the grace
period), and records the final state that outcome.py judges from the exit status and the last
event. The database stays the source of truth whichever backend runs the process. Nothing here
imports torch or training.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from models.jobs.events import published, result_of
from service.finetune.backends import BackendError, Launch, LocalProcess, RunningJob, asked_for, killpg, make_backend
from service.finetune.quotas import disk_too_full, expire_scratch, remove_scratch
from service.config import Settings
from service.finetune.job_record import Job
from service.finetune.logs import ProgressReader
from service.finetune.outcome import Outcome, Stopping, judge, with_disk_note
from service.finetune.store import JobStore, hostname, pid_alive, process_cmdline
from service.finetune.trace import JobTrace

log = logging.getLogger("tuneserve.finetune")

RETENTION_CHECK_S = 600.0  # how often the loop removes the scratch of jobs past the retention period
MAX_RECORD_RETRY_S = 8.0
STALE_WORKER_SECONDS = 30.0  # a running job whose worker has not been seen for this long is orphaned

__all__ = ["JobManager", "JobTrace", "Outcome", "Stopping"]


class JobManager:
    def __init__(self, settings: Settings):
        self.settings = settings
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
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.job_grace_seconds + 10)
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
        for job in self.store.orphaned_running(self.host, STALE_WORKER_SECONDS):
            if job.owner == self.worker_id:
                continue
            if job.pid and job.host == self.host and pid_alive(job.pid) and job.id in process_cmdline(job.pid):
                killpg(job.pid, signal.SIGTERM)
                threading.Timer(self.settings.job_grace_seconds, killpg, (job.pid, signal.SIGKILL)).start()
            self.backend.stop_orphan(job)
            if self._finish_orphan(job):
                recovered.append(job.id)
        return recovered

    def _finish_orphan(self, job: Job) -> bool:
        """`interrupted`, unless the trainer published before its worker was gone: a Ray job keeps
        running without its worker, and a local child can finish in the moment before the kernel's
        parent-death signal. The job database then says what really happened."""
        trace = JobTrace(progress={})
        trace.apply(ProgressReader(Path(job.job_dir) / f"progress-{job.attempts}.jsonl").read())
        if published(trace.succeeded):
            model, result = result_of(trace.succeeded)
            note = "its server worker stopped while it ran; the trainer finished and published on its own"
            done = self.store.finish(job.id, "succeeded", owner=job.owner, model=model, eval=result, error=note)
            log.warning("job %s succeeded without its worker (%s is gone) → %s", job.id, job.owner, model)
            return done
        reason = "the server worker running this job stopped; resume with POST /finetune/{id}/resume".format(id=job.id)
        if self.store.finish(job.id, "interrupted", owner=job.owner, error=reason):
            log.warning("job %s interrupted (worker %s is gone)", job.id, job.owner)
            return True
        return False

    # -- the loop --------------------------------------------------------------------------
    def _run_loop(self) -> None:
        last_recover = time.monotonic()
        last_retention = float("-inf")
        while not self._stop.is_set():
            try:
                self.store.heartbeat(self.worker_id)
                if time.monotonic() - last_recover > 5:
                    self.recover()
                    last_recover = time.monotonic()
                if time.monotonic() - last_retention > RETENTION_CHECK_S:
                    last_retention = time.monotonic()
                    expire_scratch(self.store, self.settings)
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
        command = [*self.settings.job_command, "--config", str(config_path), "--progress", str(progress_path)]
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
            cwd=job_dir, log_path=job_dir / "train.log",
            env={**asked_for(os.environ, self.settings.job_environment), "TUNESERVE_JOB_ID": job.id},
            num_cpus=self.settings.ray_num_cpus, num_gpus=gpus,
        )

    def _supervise(self, job: Job) -> None:
        try:
            self._run_job(job)
        except Exception as error:
            log.exception("job %s", job.id)
            self._finish(job.id, "failed", error=f"job supervisor error: {type(error).__name__} (details in the server log)")
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
            self._wake.set()

    def _run_job(self, job: Job) -> None:
        launch = self.launch(job)
        process = self._start(job, launch)
        if process is None:
            return
        returncode, trace, stopping = self._watch(job, process, launch.cwd / f"progress-{job.attempts}.jsonl")
        self._record(job, judge(returncode, trace, stopping, launch.log_path))

    def _start(self, job: Job, launch: Launch) -> RunningJob | None:
        """Hand the attempt to the backend; None (and the job failed) when it cannot start it."""
        with launch.log_path.open("ab") as log_file:
            log_file.write(f"\n=== attempt {job.attempts} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(launch.command)}\n".encode())
        try:
            process = self.backend.start(launch)
        except BackendError as error:
            self._finish(job.id, "failed", error=str(error))
            log.warning("job %s: %s", job.id, error)
            return None
        if isinstance(process, LocalProcess):
            self._try_write("record the pid of", job.id, self.store.set_pid, job.id, process.pid)
        log.info("job %s: started %s (attempt %d)", job.id, process.label, job.attempts)
        return process

    def _watch(self, job: Job, process: RunningJob, progress_path: Path) -> tuple[int | None, JobTrace, Stopping]:
        """Until the training process ends: copy its progress into the store, stop it on cancel or
        shutdown. Returns its exit code, what it reported, and whether (and how) this worker stopped it."""
        reader = ProgressReader(progress_path)
        trace = JobTrace(progress=dict(job.progress or {}) if job.resume else {})
        stopping = Stopping()
        while True:
            returncode = process.poll()
            self._store_progress(job, trace, reader.read())
            if returncode is not None:
                break
            if stopping.why is None:
                stopping = stopping.noticed(self._stop_reason(job), time.monotonic())
            stopping = self._stop_if_due(job, process, stopping, trace.phase)
            time.sleep(min(self.settings.poll_seconds, 0.5))
        self._store_progress(job, trace, reader.read())
        process.finish()  # leftovers in the group (data loader workers); Ray: the last log lines
        if stopping.why is None and self._stop.is_set():
            # the server is stopping and its supervisor may have signalled the child first
            stopping = stopping.noticed("shutdown", time.monotonic())
        return returncode, trace, stopping

    def _stop_reason(self, job: Job) -> str | None:
        if self._stop.is_set():
            return "shutdown"
        if self.store.cancel_requested(job.id):
            return "cancel"
        if disk_too_full(self.settings, Path(job.job_dir)):
            return "disk"
        return None

    def _stop_if_due(self, job: Job, process: RunningJob, stopping: Stopping, phase: str) -> Stopping:
        """Terminate once a stop is asked for, kill a grace period later; returns `stopping` with what was done."""
        now, grace = time.monotonic(), self.settings.job_grace_seconds
        due = stopping.due(phase, now, grace)
        if due == "terminate":
            log.info("job %s: %s → stopping %s", job.id, stopping.why, process.label)
            process.terminate()
            return replace(stopping, term_sent=now)
        if due == "kill":
            log.warning("job %s: still running %.0fs after SIGTERM → SIGKILL", job.id, grace)
            process.kill()
            return replace(stopping, kill_sent=now)
        return stopping

    def _store_progress(self, job: Job, trace: JobTrace, events: list[dict[str, Any]]) -> None:
        if trace.apply(events):
            trace.progress["updated"] = time.time()
            self._try_write("record progress of", job.id, self.store.update_progress, job.id, trace.progress, trace.phase)

    def _record(self, job: Job, outcome: Outcome) -> None:
        state, model, error = outcome.state, outcome.model, outcome.error
        if state == "failed":
            error = with_disk_note(error, Path(job.job_dir))
        if self._finish(job.id, state, model=model, eval=outcome.eval, error=error):
            log.info("job %s: %s%s", job.id, state, f" ({error})" if error else f" → {model}")
            if state == "succeeded":
                remove_scratch(job)  # the published version has its own checkpoint.pt
        else:
            log.warning("job %s: finished as %s but the store no longer had it running", job.id, state)

    def _try_write(self, what: str, job_id: str, write, *args) -> None:
        """A job-store write the job can do without (progress, pid): a failure is logged, not fatal."""
        try:
            write(*args)
        except (sqlite3.Error, OSError) as error:  # OSError: StorageFull, the database on a full disk
            log.warning("job %s: cannot %s it in the job database (%s); continuing", job_id, what, error)

    def _finish(self, job_id: str, state: str, **fields: Any) -> bool:
        """Write a job's outcome, retrying while the database cannot be written (a full disk):
        the outcome is never dropped. Gives up only when the worker stops; the job is then still
        `running` in the database and the next start marks it `interrupted` (resumable)."""
        delay = 0.5
        while True:
            try:
                return self.store.finish(job_id, state, owner=self.worker_id, **fields)
            except (sqlite3.Error, OSError) as error:  # OSError: StorageFull, the database on a full disk
                log.error("job %s: cannot record %s in the job database (%s); retrying in %.1fs", job_id, state, error, delay)
            if self._stop.wait(delay) and delay >= MAX_RECORD_RETRY_S:
                return False
            delay = min(delay * 2, MAX_RECORD_RETRY_S)
