"""The job store: claiming exactly once (threads and processes), the concurrency cap,
state transitions, and detection of jobs whose worker died."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

from service.finetune.store import JobStore, hostname, process_start


def _store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def _claim_all(db: str, owner: str, out, max_concurrent: int) -> None:
    store = JobStore(db)
    claimed = []
    for _ in range(200):
        job = store.claim(owner, "h", max_concurrent)
        if job is not None:
            claimed.append(job.id)
    out.put(claimed)


def test_create_list_claim_finish(tmp_path):
    store = _store(tmp_path)
    a = store.create({"name": "a"}, "/d", tmp_path / "a")
    b = store.create({"name": "b"}, "/d", tmp_path / "b")
    assert [j.id for j in store.list()] == [b.id, a.id]  # newest first
    assert [j.id for j in store.list("queued")] == [b.id, a.id]
    job = store.claim("w1", "h", max_concurrent=1)
    assert job.id == a.id and job.state == "running" and job.attempts == 1 and job.owner == "w1"
    assert store.claim("w2", "h", max_concurrent=1) is None  # the cap counts every worker's jobs
    store.update_progress(a.id, {"epoch": 1}, "training")
    assert store.get(a.id).progress == {"epoch": 1} and store.get(a.id).phase == "training"
    assert not store.finish(a.id, "succeeded", owner="w2")  # only the owner finishes it
    assert store.finish(a.id, "succeeded", owner="w1", model="a:v1", eval={"accuracy": 1.0})
    done = store.get(a.id)
    assert done.state == "succeeded" and done.model == "a:v1" and done.eval == {"accuracy": 1.0} and done.finished
    assert store.list("succeeded")[0].id == a.id
    assert store.claim("w2", "h", max_concurrent=1).id == b.id


def test_cancel_queued_and_running(tmp_path):
    store = _store(tmp_path)
    a = store.create({"name": "a"}, "/d", tmp_path / "a")
    b = store.create({"name": "b"}, "/d", tmp_path / "b")
    store.claim("w", "h", 5)
    assert store.request_cancel(b.id).state == "cancelled"  # queued: at once
    running = store.request_cancel(a.id)
    assert running.state == "running" and running.cancel_requested  # running: the owner acts
    assert store.claim("w", "h", 5) is None  # a cancelled job is never claimed


def test_claim_exactly_once_threads(tmp_path):
    store = _store(tmp_path)
    ids = {store.create({"name": f"j{i}"}, "/d", tmp_path / str(i)).id for i in range(30)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n):
        mine = JobStore(store.path)
        while (job := mine.claim(f"w{n}", "h", 1000)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_claim_exactly_once_processes_and_cap(tmp_path):
    store = _store(tmp_path)
    ids = {store.create({"name": f"j{i}"}, "/d", tmp_path / str(i)).id for i in range(20)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(store.path), f"p{n}", out, 1000)) for n in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    flat = [j for r in results for j in r]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    # with a cap of 2 only two more can run, whoever asks
    more = {store.create({"name": f"k{i}"}, "/d", tmp_path / f"k{i}").id for i in range(5)}
    for job in store.list("running"):
        store.finish(job.id, "succeeded")
    procs = [ctx.Process(target=_claim_all, args=(str(store.path), f"q{n}", out, 2)) for n in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    assert sum(len(r) for r in results) == 2 and len(store.list("running")) == 2 and len(more) == 5


def test_orphaned_running_jobs_are_found(tmp_path):
    store = _store(tmp_path)
    host = hostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.register_worker("dead-worker", host, dead.pid)
    store.register_worker("live-worker", host, os.getpid())
    a = store.create({"name": "a"}, "/d", tmp_path / "a")
    b = store.create({"name": "b"}, "/d", tmp_path / "b")
    c = store.create({"name": "c"}, "/d", tmp_path / "c")
    assert store.claim("dead-worker", host, 10).id == a.id
    assert store.claim("live-worker", host, 10).id == b.id
    assert store.claim("never-registered", host, 10).id == c.id
    orphans = {j.id for j in store.orphaned_running(host, stale_after_s=30)}
    assert orphans == {a.id, c.id}
    # a live pid with a different start time (pid reused after a restart) is a dead owner too
    with store._tx() as conn:
        conn.execute("UPDATE workers SET pid_start = 'other' WHERE id = 'live-worker'")
    assert b.id in {j.id for j in store.orphaned_running(host, 30)}
    assert process_start(os.getpid())


def test_resume_requeues_only_resumable(tmp_path):
    store = _store(tmp_path)
    a = store.create({"name": "a"}, "/d", tmp_path / "a")
    assert not store.requeue_for_resume(a.id)  # queued
    store.claim("w", "h", 1)
    store.finish(a.id, "interrupted", error="server stopped")
    assert store.requeue_for_resume(a.id)
    job = store.get(a.id)
    assert job.state == "queued" and job.resume and job.error is None
    again = store.claim("w", "h", 1)
    assert again.attempts == 2 and again.resume


def test_client_and_store_agree_on_ended_states():
    from models.jobs.events import ENDED_STATES, RESUMABLE_STATES, STATES
    from tuneserve.client import ENDED_STATES as CLIENT_ENDED

    assert CLIENT_ENDED is ENDED_STATES  # one source, not a copy kept equal
    assert ENDED_STATES == set(STATES) - {"queued", "running"}
    assert RESUMABLE_STATES < ENDED_STATES


def test_log_tail_reads_as_many_lines_as_asked(tmp_path):
    from service.finetune.logs import tail_lines

    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i:05d} " + "x" * 80 + "\n" for i in range(2000)))
    tail = tail_lines(log, 500).splitlines()
    assert len(tail) == 500 and tail[0].startswith("line 01500") and tail[-1].startswith("line 01999")
    assert tail_lines(tmp_path / "missing.log", 5) == ""
