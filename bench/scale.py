"""Scaling benchmark (issue 32, item 1): the same default `tuneserve train` job on 1k, 5k, 20k and 60k
Fashion-MNIST images, with the seconds and peak RSS of every stage, and how each grows with the data.

    .venv/bin/python bench/scale.py --sizes 1000 5000 20000 60000 [--root /tmp/tuneserve-scale]
        [--source-dir /work/scale/fashion60k] [--plot docs/scale/scale.png]

Data: ROOT/fashion-<n>/train/<label>/<i>.png, a stratified subset of n official train images (n/10 per
class, seed --seed; <i> is the image's index in the IDX file), written as grey 28x28 PNGs from Debian's
dataset-fashion-mnist (--fashion-dir), or hard-linked from --source-dir/train (a folder of the same
layout: all 60,000 images). ROOT/test holds the official 10,000 test images once (written, or a link
to --source-dir/test) and ROOT/fashion-<n>/test links to it. Folders already there are reused.

Run: `tuneserve train --name scale-<n> --data ROOT/fashion-<n> --output-dir ROOT/runs/scale-<n>
--progress ROOT/runs/scale-<n>/progress.jsonl`, every other setting the default; TUNESERVE_HOME and
BENTOML_HOME in ROOT/store; stdout and stderr to ROOT/runs/scale-<n>.log. The RSS of the job's whole
process tree is sampled every 0.25 s; the load average is taken before and after each job. The samples,
times and exit code go to ROOT/runs/scale-<n>.job.json: `--reparse --sizes ...` recomputes the sizes'
records from those files and the jobs' own, without running anything.

Stages, from the job's progress events (models/jobs/events.py): each `phase` or `stage` event starts a
span that runs until an event names something else. The first stage after a phase change takes over
that phase's span (the work since the phase change is the stage's). A stage that reports done >= total
ends there: the time until the next stage or phase event counts to the enclosing phase's name (work
no stage event names, such as a fine-tune that only reports epochs), unless under 0.5 s. Phases without stage events keep
their names; `startup` is the time before the first event. Each RSS sample counts to the span it falls in.

Writes bench/results/scale.json (merged per size, so sizes can be run one at a time), prints a
markdown table (per size: total seconds, the job's own budget, peak RSS, test accuracy, then seconds /
peak RSS per stage) and the log-log slope of each stage (least squares of log seconds, and of log peak
RSS, on log n over the sizes present), and plots both against n on log-log axes to --plot.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.transfer_data import FASHION_DIR, FASHION_LABELS, idx_pair, stratified_subset  # noqa: E402
from models.jobs.events import PHASES, STAGES, parse_line  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
PLOT = ROOT / "docs" / "scale" / "scale.png"
SAMPLE_S = 0.25
TAIL_S = 0.5  # a finished stage keeps a gap this short before the next event (not worth a span of its own)
GIB = 1024 ** 3
STARTUP = "startup"
ORDER = (STARTUP, *STAGES, *PHASES)


# --- data ------------------------------------------------------------------------------------------

def subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of n items, n / classes of each class, chosen with `seed`."""
    classes = np.unique(labels).size
    if n % classes:
        raise ValueError(f"{n} images do not split evenly over {classes} classes")
    return stratified_subset(labels, n // classes, seed)


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, positions) -> None:
    from PIL import Image

    for i in positions:
        target = folder / FASHION_LABELS[labels[i]] / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target)


def link_pngs(folder: Path, source_train: Path, n: int, seed: int) -> None:
    """The subset from a folder of PNGs named by IDX index (hard links; copies across file systems)."""
    files = sorted((p for label in FASHION_LABELS for p in (source_train / label).glob("*.png")), key=lambda p: p.stem)
    labels = np.array([FASHION_LABELS.index(p.parent.name) for p in files])
    for i in subset(labels, n, seed):
        target = folder / files[i].parent.name / files[i].name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(files[i], target)
        except OSError:
            shutil.copyfile(files[i], target)


def ensure_test(root: Path, source: Path | None, fashion: Path) -> Path:
    test = root / "test"
    if test.exists():
        return test
    if source:
        test.symlink_to((source / "test").resolve(), target_is_directory=True)
        return test
    images, labels = idx_pair(fashion, "t10k")
    partial = root / "test.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_pngs(partial, images, labels, range(labels.size))
    partial.rename(test)
    return test


def ensure_data(root: Path, n: int, seed: int, source: Path | None, fashion: Path) -> Path:
    """ROOT/fashion-<n> with train/ (written once, then reused) and test/ (a link to ROOT/test)."""
    data = root / f"fashion-{n}"
    test = ensure_test(root, source, fashion)
    if not (data / "train").is_dir():
        partial = data / "train.partial"
        shutil.rmtree(partial, ignore_errors=True)
        if source:
            link_pngs(partial, source / "train", n, seed)
        else:
            images, labels = idx_pair(fashion, "train")
            write_pngs(partial, images, labels, subset(labels, n, seed))
        partial.rename(data / "train")
    if not (data / "test").exists():
        (data / "test").symlink_to(test.absolute(), target_is_directory=True)
    return data


# --- the job ---------------------------------------------------------------------------------------

def tree_rss(pid: int) -> int:
    """Bytes resident in the process and all its descendants (0 once it is gone)."""
    import psutil  # a dependency of BentoML, so always in the project's environment

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_job(root: Path, n: int, data: Path) -> dict:
    """Run the default job on `data`: its exit code, start and end (epoch seconds), RSS samples, files."""
    out, log = root / "runs" / f"scale-{n}", root / "runs" / f"scale-{n}.log"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = root / "store"
    env = {**os.environ, "TUNESERVE_HOME": str(store / "tuneserve"), "BENTOML_HOME": str(store / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    command = [str(Path(sys.executable).with_name("tuneserve")), "train", "--name", f"scale-{n}", "--data", str(data),
               "--output-dir", str(out), "--progress", str(out / "progress.jsonl")]
    samples: list[tuple[float, int]] = []
    started = time.time()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        while process.poll() is None:
            samples.append((time.time(), tree_rss(process.pid)))
            time.sleep(SAMPLE_S)
    return {"rc": process.returncode, "started": started, "ended": time.time(), "samples": samples, "log": str(log),
            "progress": str(out / "progress.jsonl"), "command": command}


# --- the pure parts: spans, per-stage table, summary, slopes --------------------------------------

def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [event for line in path.read_text().splitlines() if (event := parse_line(line))]


def spans(events: list[dict], started: float, ended: float) -> list[tuple[str, float, float]]:
    """[(label, start, end)] from `started` to `ended`, from the phase and stage events (module docstring)."""
    phase, open_spans = STARTUP, [[STARTUP, started, "startup"]]  # label, start, what began it: phase | stage | done
    for event in events:
        kind, at = event.get("event"), event.get("time")
        if at is None or kind not in ("phase", "stage"):
            continue
        if kind == "phase":
            phase = event.get("phase")
            open_spans.append([phase, at, "phase"])
            continue
        current, name = open_spans[-1], event.get("stage")
        if current[2] == "phase":  # the phase's first stage: the work since the phase change is the stage's
            current[0], current[2] = name, "stage"
        elif current[2] != "stage" or current[0] != name:
            open_spans.append([name, at, "stage"])
        if event.get("done") is not None and event.get("total") is not None and event["done"] >= event["total"]:
            open_spans.append([phase, at, "done"])  # what follows a finished stage is its phase's, unnamed
    ends = [start for _, start, _ in open_spans[1:]] + [ended]
    found: list[tuple[str, float, float]] = []
    for (label, start, began), end in zip(open_spans, ends):
        if began == "done" and end - start < TAIL_S and found:  # bookkeeping before the next event: the stage's
            found[-1] = (found[-1][0], found[-1][1], max(found[-1][2], end))
        else:
            found.append((label, start, max(start, end)))
    return found


def stage_table(job_spans: list[tuple[str, float, float]], samples: list[tuple[float, int]]) -> dict[str, dict]:
    """label → seconds (summed over its spans) and peak RSS in GiB (None: no sample fell in it), in ORDER."""
    table: dict[str, dict] = {}
    for label, start, end in job_spans:
        row = table.setdefault(label, {"seconds": 0.0, "peak": 0})
        row["seconds"] += end - start
        row["peak"] = max([row["peak"], *(rss for at, rss in samples if start <= at < end)])
    rank = {label: i for i, label in enumerate(ORDER)}
    return {label: {"seconds": round(row["seconds"], 2), "peak_rss_gib": round(row["peak"] / GIB, 3) if row["peak"] else None}
            for label, row in sorted(table.items(), key=lambda item: rank.get(item[0], len(rank)))}


def final_summary(text: str) -> dict | None:
    """The JSON object the CLI prints last (indented, so it starts with a line that is just `{`)."""
    decoder = json.JSONDecoder()
    for match in reversed(list(re.finditer(r"^\{$", text, re.M))):
        try:
            found, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def slope(ns: list[int], values: list[float | None]) -> float | None:
    """Least-squares slope of log value on log n (values missing or 0 left out; None under 2 sizes)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v]
    if len({x for x, _ in points}) < 2:
        return None
    x, y = np.array(points).T
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def labels_of(sizes: dict) -> list[str]:
    found = {label for record in sizes.values() for label in record["stages"]}
    return [label for label in ORDER if label in found] + sorted(found - set(ORDER))


def value(record: dict, label: str, key: str) -> float | None:
    """A size's `seconds` or `peak_rss_gib` for a stage, or for the whole job (label "total")."""
    if label == "total":
        return record["total_s" if key == "seconds" else "peak_rss_gib"]
    return record["stages"].get(label, {}).get(key)


def slopes(sizes: dict) -> dict[str, dict]:
    """label ("total" and each stage) → the log-log slopes of its seconds and peak RSS over the sizes."""
    ns = sorted(sizes, key=int)
    return {label: {"seconds": slope([int(n) for n in ns], [value(sizes[n], label, "seconds") for n in ns]),
                    "peak_rss": slope([int(n) for n in ns], [value(sizes[n], label, "peak_rss_gib") for n in ns])}
            for label in ["total", *labels_of(sizes)]}


# --- one size: run, parse, record -------------------------------------------------------------------

def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def record(n: int, job: dict) -> dict:
    """A size's result from its job file (run_job's answer and the load averages)."""
    events = read_events(Path(job["progress"]))
    job_spans = spans(events, job["started"], job["ended"])
    summary = final_summary(Path(job["log"]).read_text(errors="replace")) or {}
    budgets = [event["budget_s"] for event in events if event.get("event") == "budget"]
    peak = max((rss for _, rss in job["samples"]), default=0)
    return {
        "images": n, "rc": job["rc"], "total_s": round(job["ended"] - job["started"], 1),
        "budget_s": budgets[-1] if budgets else None, "budgets_s": budgets, "peak_rss_gib": round(peak / GIB, 3),
        "accuracy": (summary.get("eval") or {}).get("accuracy"), "model": summary.get("model"),
        "job_seconds": summary.get("seconds"), "train_seconds": summary.get("train_seconds"),
        "timed_from": "stage events" if any(e.get("event") == "stage" for e in events) else "phase events only",
        "stages": stage_table(job_spans, job["samples"]),
        "spans": [[label, round(start - job["started"], 2), round(end - job["started"], 2)] for label, start, end in job_spans],
        "load_before": job["load_before"], "load_after": job["load_after"], "rss_samples": len(job["samples"]),
        "command": " ".join(job["command"][1:]), "log": job["log"], "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(job["started"])),
    }


def job_file(root: Path, n: int) -> Path:
    """Everything a size's record is computed from besides the job's own files (for --reparse)."""
    return root / "runs" / f"scale-{n}.job.json"


def measure(root: Path, n: int, data: Path) -> dict:
    load_before = load()
    print(f"scale-{n}: {data}; load average before {load_before}", flush=True)
    job = run_job(root, n, data)
    job |= {"load_before": load_before, "load_after": load()}
    job_file(root, n).write_text(json.dumps(job))
    result = record(n, job)
    print(f"scale-{n}: exit {job['rc']} after {result['total_s']} s, peak {result['peak_rss_gib']} GiB, accuracy "
          f"{result['accuracy']}; load average after {job['load_after']}", flush=True)
    if job["rc"]:
        print(Path(job["log"]).read_text(errors="replace")[-3000:], file=sys.stderr)
    return result


# --- output -----------------------------------------------------------------------------------------

def cell(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(sizes: dict) -> str:
    labels = labels_of(sizes)
    lines = ["| images | total s | budget s | peak GiB | accuracy | " + " | ".join(f"{label} s / GiB" for label in labels) + " |",
             "|" + "---|" * (5 + len(labels))]
    for n in sorted(sizes, key=int):
        r = sizes[n]
        stages = [f"{cell(r['stages'].get(k, {}).get('seconds'))} / {cell(r['stages'].get(k, {}).get('peak_rss_gib'), 2)}"
                  for k in labels]
        lines.append(f"| {int(n):,} | {cell(r['total_s'])} | {cell(r['budget_s'])} | {cell(r['peak_rss_gib'], 2)} | "
                     f"{cell(r['accuracy'], 4)} | " + " | ".join(stages) + " |")
    return "\n".join(lines)


def slope_markdown(fitted: dict) -> str:
    lines = ["| stage | seconds ∝ n^ | peak RSS ∝ n^ |", "|---|---|---|"]
    lines += [f"| {label} | {cell(row['seconds'], 2)} | {cell(row['peak_rss'], 2)} |" for label, row in fitted.items()]
    return "\n".join(lines)


def plot(sizes: dict, fitted: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = sorted(sizes, key=int)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for i, label in enumerate(["total", *labels_of(sizes)]):
        style = {"color": "black", "linewidth": 2.5} if label == "total" else \
            {"color": plt.cm.tab20(i % 20), "linewidth": 1.2, "linestyle": "-" if label in STAGES else "--"}  # phases dashed
        for axis, key, fit in ((axes[0], "seconds", "seconds"), (axes[1], "peak_rss_gib", "peak_rss")):
            points = [(int(n), v) for n in ns if (v := value(sizes[n], label, key))]
            if points:
                axis.loglog(*zip(*points), marker="o", label=f"{label} (slope {cell(fitted[label][fit], 2)})", **style)
    for axis, title in zip(axes, ("seconds per stage", "peak RSS per stage (GiB, whole process tree)")):
        axis.set(xlabel="train images", title=title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 60000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/tuneserve-scale"), help="data, runs and the store")
    parser.add_argument("--source-dir", type=Path, help="a train/ + test/ PNG folder of all of Fashion-MNIST to link from")
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR, help="the IDX files (without --source-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--reparse", action="store_true", help="no runs: recompute the sizes' records from ROOT/runs")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"sizes": {}}
    for n in args.sizes:
        if args.reparse:
            results["sizes"][str(n)] = record(n, json.loads(job_file(args.root, n).read_text()))
        else:
            results["sizes"][str(n)] = measure(args.root, n, ensure_data(args.root, n, args.seed, args.source_dir, args.fashion_dir))
        results["slopes"] = slopes(results["sizes"])
        results["cores"] = len(os.sched_getaffinity(0))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results["sizes"]))
    print()
    print(slope_markdown(results["slopes"]))
    print(f"plot: {args.plot}" if plot(results["sizes"], results["slopes"], args.plot) else "no matplotlib: no plot")
    return 0 if all(results["sizes"][str(n)]["rc"] == 0 for n in args.sizes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
