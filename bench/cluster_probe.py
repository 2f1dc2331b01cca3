"""Helpers for bench/cluster.sh that are easier in Python than in shell.

  load URL KEY OUT STOP_FILE HAPROXY_SOCKET
      POST /classify through the balancer from 4 threads until STOP_FILE exists; one JSON line per
      request (start, end, status, X-Served-By) and per change of a backend server's health as
      haproxy sees it (polled on its stats socket every 50 ms).
  kill-report LOAD_LOG KILLED_SERVER KILL_T RESTART_T
      failed requests between the SIGKILL and haproxy marking the server DOWN, failed ones after,
      the time from restart to UP, and whether the restarted server answered again → one JSON line.
  server-up HAPROXY_SOCKET BACKEND/SERVER → exit 0 when haproxy has that server UP.
  ray-nodes DASHBOARD_URL → {node_id: ip} of the live and dead nodes.
  job-node DASHBOARD_URL SUBMISSION_ID → the IP of the node that ran that Ray job's driver.
  scorer-nodes DASHBOARD_URL → the IPs of the nodes that ran Ray Data scoring actors.
  rows PARQUET → {"rows": n, "unique_paths": n, "errors": n}.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

THREADS = 4
TIMEOUT_S = 5.0


def haproxy_states(socket_path: str) -> dict[str, str]:
    """`backend/server` → status (UP, DOWN, …) from haproxy's `show stat`."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(socket_path)
        conn.sendall(b"show stat\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") not in (None, "FRONTEND", "BACKEND"):
            states[f"{row['pxname']}/{row['svname']}"] = row["status"].split(" ")[0]
    return states


def watch_haproxy(socket_path: str, stop: Path, emit) -> None:
    last: dict[str, str] = {}
    while not stop.exists():
        try:
            states = haproxy_states(socket_path)
        except OSError:
            states = {}
        for server, status in states.items():
            if last.get(server) != status:
                emit({"event": "health", "t": time.time(), "server": server, "status": status})
        last.update(states)
        time.sleep(0.05)


def request_loop(url: str, key: str, stop: Path, emit) -> None:
    import httpx

    from tests.finetune_support import png

    image = png((220, 20, 20))
    with httpx.Client(timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {key}"}) as client:
        while not stop.exists():
            started = time.time()
            try:
                answer = client.post(url, files={"image": ("r.png", image, "image/png")})
                status, server = answer.status_code, answer.headers.get("x-served-by", "")
            except httpx.HTTPError as error:
                status, server = f"error: {type(error).__name__}", ""
            emit({"event": "request", "start": started, "end": time.time(), "status": status, "server": server})


def load(url: str, key: str, out: str, stop_file: str, socket_path: str) -> None:
    stop, lock = Path(stop_file), threading.Lock()
    with open(out, "w") as handle:
        def emit(record: dict) -> None:
            with lock:
                handle.write(json.dumps(record) + "\n")
                handle.flush()

        threads = [threading.Thread(target=request_loop, args=(url, key, stop, emit)) for _ in range(THREADS)]
        threads.append(threading.Thread(target=watch_haproxy, args=(socket_path, stop, emit)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def kill_report(load_log: str, server: str, kill_t: float, restart_t: float) -> dict:
    records = [json.loads(line) for line in Path(load_log).read_text().splitlines() if line.strip()]
    health = [r for r in records if r["event"] == "health" and r["server"].endswith("/" + server)]
    requests = [r for r in records if r["event"] == "request"]
    down = next((r["t"] for r in health if r["t"] >= kill_t and r["status"] != "UP"), None)
    up = next((r["t"] for r in health if r["t"] >= restart_t and r["status"] == "UP"), None)
    failed = [r for r in requests if r["status"] != 200 and r["end"] >= kill_t]
    # the survivor marked DOWN too (a check timing out on an overloaded machine) explains 503s
    others_down = [r for r in records if r["event"] == "health" and r["t"] >= kill_t and r["status"] != "UP"
                   and r["server"].startswith("replicas/") and not r["server"].endswith("/" + server)]
    return {
        "requests": len(requests),
        "ok": sum(r["status"] == 200 for r in requests),
        "failed_before_down": sum(down is None or r["start"] < down for r in failed),
        "failed_after_down": sum(down is not None and r["start"] >= down for r in failed),
        "failures": sorted({str(r["status"]) for r in failed}),
        "down_after_s": None if down is None else round(down - kill_t, 2),
        "rejoin_s": None if up is None else round(up - restart_t, 2),
        "survivor_marked_down": len(others_down),
        "served_by_restarted": sum(r["status"] == 200 and r["server"] == server and up is not None and r["start"] > up
                                   for r in requests),
    }


def _state_api():
    from ray.util import state

    return state


def ray_nodes(dashboard: str) -> dict[str, str]:
    return {n.node_id: n.node_ip for n in _state_api().list_nodes(address=dashboard, limit=100)}


def job_node(dashboard: str, submission: str) -> str:
    import httpx

    details = httpx.get(f"{dashboard}/api/jobs/{submission}", timeout=10).json()
    info = details.get("driver_info") or {}
    return info.get("node_ip_address") or ray_nodes(dashboard).get(details.get("driver_node_id"), "unknown")


def scorer_nodes(dashboard: str) -> list[str]:
    nodes = ray_nodes(dashboard)
    actors = _state_api().list_actors(address=dashboard, limit=1000, detail=True)
    return sorted({nodes.get(a.node_id, a.node_id) for a in actors if "_RayScorer" in (a.class_name or "")})


def rows(path: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return {"rows": len(table["path"]), "unique_paths": len(set(table["path"])),
            "errors": sum(e is not None for e in table["error"])}


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "load":
        load(*args)
    elif command == "kill-report":
        print(json.dumps(kill_report(args[0], args[1], float(args[2]), float(args[3]))))
    elif command == "server-up":
        raise SystemExit(0 if haproxy_states(args[0]).get(args[1]) == "UP" else 1)
    elif command == "ray-nodes":
        print(json.dumps(ray_nodes(args[0])))
    elif command == "job-node":
        print(job_node(args[0], args[1]))
    elif command == "scorer-nodes":
        print(" ".join(scorer_nodes(args[0])))
    elif command == "rows":
        print(json.dumps(rows(args[0])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
