"""Score output files: formats, the resume journal, and the evaluation computed from the rows.

The output is never half-written: complete rows go to a journal (`OUTPUT.partial.jsonl`) a batch
at a time, and the output file is written from it to a temporary file and renamed into place.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("tuneserve.score")

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
CHUNK_ROWS = 10_000  # rows per Parquet row group / per merge step


# --------------------------------------------------------------------------- reading and writing outputs


def output_format(path: Path) -> str:
    return FORMATS[path.suffix.lower()]


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".eval.json")


def read_rows(path: Path, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a finished output file, with probabilities as floats and empty cells as None."""
    fmt = fmt or output_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
            yield from batch.to_pylist()
    elif fmt == "jsonl":
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    else:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                yield {k: _from_csv(k, v) for k, v in row.items()}


def _from_csv(column: str, value: str | None) -> Any:
    if value in (None, ""):
        return None
    if column.startswith("probability_") or column == "in_domain":
        return float(value)
    return value == "True" if column == "abstained" else value


def _arrow_schema(columns: list[str]):
    import pyarrow as pa

    def kind(column: str):
        if column.startswith("probability_") or column == "in_domain":
            return pa.float64()
        return pa.bool_() if column == "abstained" else pa.string()

    return pa.schema([(c, kind(c)) for c in columns])


def write_rows(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> int:
    """Stream rows to `path` in its format (whole file; callers write to a temporary name)."""
    fmt = output_format(path)
    count = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _arrow_schema(columns)
        with pq.ParquetWriter(path, schema) as writer:
            chunk: list[dict] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) >= CHUNK_ROWS:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    count += len(chunk)
                    chunk = []
            if chunk or count == 0:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                count += len(chunk)
        return count
    with path.open("w", newline="") as handle:
        if fmt == "csv":
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                count += 1
        else:
            for row in rows:
                handle.write(json.dumps({c: row.get(c) for c in columns}) + "\n")
                count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count


class Journal:
    """Append-only JSONL of finished rows; whole batches per write, fsynced; torn tail dropped on open."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = journal_path(self.output)

    def read(self) -> list[dict[str, Any]]:
        """Complete rows already journaled; truncates a torn last line so appends start clean."""
        if not self.path.exists():
            return []
        rows, good_end = [], 0
        with self.path.open("rb") as handle:
            data = handle.read()
        position = 0
        while position < len(data):
            end = data.find(b"\n", position)
            if end < 0:
                break  # torn: no newline
            line = data[position:end]
            try:
                if line.strip():
                    rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            position = good_end = end + 1
        if good_end < len(data):
            log.warning("dropping a torn last line in %s (%d bytes)", self.path, len(data) - good_end)
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)
        return rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        payload = "".join(json.dumps(row) + "\n" for row in rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self, columns: list[str]) -> int:
        """Earlier output rows + journal rows → OUTPUT (temporary file, then rename); journal removed."""
        previous = self.output if self.output.exists() else None
        journal_rows = self.read()
        if previous is not None and not journal_rows:  # nothing new: leave the output as it is
            self.path.unlink(missing_ok=True)
            return sum(1 for _ in read_rows(previous))
        # (no output and no rows still writes an empty output with its header/schema)
        temporary = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}{self.output.suffix}")

        def all_rows():
            if previous is not None:
                yield from read_rows(previous)
            yield from journal_rows

        try:
            count = write_rows(temporary, all_rows(), columns)
            os.replace(temporary, self.output)
        finally:
            temporary.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        return count


def done_rows(output: Path, columns: list[str]) -> set[str]:
    """Paths already scored: rows of a finished output plus complete rows in the journal."""
    done: set[str] = set()
    if output.exists():
        for number, row in enumerate(read_rows(output)):
            if number == 0:
                _check_columns(row, columns, output)
            done.add(row["path"])
    journaled = Journal(output).read()
    if journaled:
        _check_columns(journaled[0], columns, journal_path(output))
    done.update(row["path"] for row in journaled)
    return done


def _check_columns(row: dict, columns: list[str], where: Path) -> None:
    from models.errors import DatasetError

    if set(row) != set(columns):
        raise DatasetError(
            f"{where} has columns {list(row)}, this run writes {columns}: resume with the same --top-k and "
            "input (labelled or not), or choose another --output"
        )


# --------------------------------------------------------------------------- evaluation from the output


def evaluate_rows(rows: Iterable[dict[str, Any]], labels: list[str], top_k: int, model_tag: str) -> dict[str, Any] | None:
    """The eval.json report from scored rows (the top-k columns are enough for accuracy, top-k, P/R/F1)."""
    import numpy as np

    from models.data.metrics import evaluation_report

    index = {label: i for i, label in enumerate(labels)}
    y_true, matrix, unreadable = [], [], {}
    for row in rows:
        if row.get("error"):
            unreadable[row["path"]] = row["error"]
            continue
        if row.get("true_label") is None:
            continue
        probs = np.zeros(len(labels), np.float64)
        for i in range(1, top_k + 1):
            label = row.get(f"label_{i}")
            if label is not None:
                # Keep the ranking even if a probability underflowed to 0.
                probs[index[label]] = max(float(row[f"probability_{i}"]), 1e-300 * (top_k + 1 - i))
        y_true.append(index[row["true_label"]])
        matrix.append(probs)
    if not y_true:
        return None
    report = evaluation_report(y_true, np.stack(matrix), labels, top_k=top_k)
    report["model"] = model_tag
    report["labels_evaluated"] = sorted({labels[i] for i in y_true}, key=index.get)
    report["unreadable"] = unreadable
    if top_k < 5:
        report["note"] = f"computed from the top-{top_k} columns of the output"
    return report


