"""A Python client for a tuneserve server, typed with the server's own response models (service/schemas.py).

    from tuneserve.client import Client

    with Client("http://127.0.0.1:3000") as client:
        print(client.classify("cat.jpg").label)

`api_key`: given, else $TUNESERVE_API_KEY, else the server's key file when the server runs on this
machine (models/serving/api_keys.py). Every refusal raises `ClientError` with the server's status and message.
"""
from __future__ import annotations

import io
import json
import tempfile
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Union

import httpx

from models.jobs.events import ENDED_STATES  # nothing changes after these until a resume
from service.schemas import BatchResult, EvalReport, Job, JobList, JobSubmitted, ModelDetail, ModelList, Prediction


Image = Union[str, Path, bytes, "PIL.Image.Image"]  # noqa: F821 - PIL is optional


class ClientError(Exception):
    """The server refused (status and its `error` message), or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, transport: httpx.BaseTransport | None = None):
        from models.serving.api_keys import client_key
        from service.config import key_settings

        self.url = url.rstrip("/")
        self.api_key = api_key or client_key(self.url, key_settings())
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- HTTP --------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a 4xx/5xx raises ClientError with the server's message."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ClientError(f"cannot reach {self.url}: {error}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except (ValueError, AttributeError):
                message = response.text
            raise ClientError(f"{method} {path}: HTTP {response.status_code}: {message}", response.status_code)
        return response

    # ---- classify and evaluate ---------------------------------------------------------------
    def classify(self, image: Image, model: str | None = None, top_k: int | None = None,
                 min_confidence: float | str | None = None) -> Prediction:
        """One image (a path, bytes or a PIL image) → its Prediction."""
        fields = _fields(model=model, top_k=top_k, min_confidence=min_confidence)
        response = self.request("POST", "/classify", files=[("image", _image_part(image))], data=fields)
        return Prediction.model_validate(response.json())

    def classify_batch(self, images: Iterable[Image], model: str | None = None, top_k: int | None = None,
                       min_confidence: float | str | None = None) -> BatchResult:
        """Several images in one request; one result (or per-image error) each, in order."""
        files = [("images", _image_part(image)) for image in images]
        fields = _fields(model=model, top_k=top_k, min_confidence=min_confidence)
        return BatchResult.model_validate(self.request("POST", "/classify_batch", files=files, data=fields).json())

    def evaluate(self, data: str | Path | None = None, *, data_path: str | None = None, model: str | None = None,
                 compare_with: str | None = None, top_k: int | None = None, split: str | None = None) -> EvalReport:
        """A labelled folder or zip here (`data`), or a folder under the server's data root (`data_path`)."""
        fields = _fields(data_path=data_path, model=model, compare_with=compare_with, top_k=top_k, split=split)
        with _dataset_upload(data) as files:
            response = self.request("POST", "/evaluate", files=files or None, data=fields)
        return EvalReport.model_validate(response.json())

    # ---- models ------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList.model_validate(self.request("GET", "/models").json())

    def model(self, name: str) -> ModelDetail:
        """`name` (every version) or `name:version`."""
        return ModelDetail.model_validate(self.request("GET", f"/models/{name}").json())

    # ---- fine-tune jobs ----------------------------------------------------------------------
    def finetune(self, config: dict[str, Any] | None = None, *, data: str | Path | None = None,
                 data_path: str | None = None, **fields: Any) -> "JobHandle":
        """Submit a fine-tune job: `config` (and/or keyword fields: name=, source=, epochs=, …) and the
        data as a local folder or zip (`data`) or a folder under the server's data root (`data_path`)."""
        config = {**(config or {}), **fields}
        form = _fields(config=json.dumps(config), data_path=data_path)
        with _dataset_upload(data) as files:
            response = self.request("POST", "/finetune", files=files or None, data=form)
        submitted = JobSubmitted.model_validate(response.json())
        return JobHandle(self, submitted.job_id, submitted)

    def job(self, job_id: str) -> Job:
        return Job.model_validate(self.request("GET", f"/finetune/{job_id}").json())

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        params = {"limit": limit, **({"state": state} if state else {})}
        return JobList.model_validate(self.request("GET", "/finetune", params=params).json()).jobs

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self.request("POST", f"/finetune/{job_id}/cancel").json())

    def resume(self, job_id: str) -> Job:
        return Job.model_validate(self.request("POST", f"/finetune/{job_id}/resume").json())

    def log(self, job_id: str, lines: int = 200) -> str:
        return self.request("GET", f"/finetune/{job_id}/log", params={"lines": lines}).text


class JobHandle:
    """A submitted fine-tune job: `wait()` until it ends, `cancel()`, `refresh()`."""

    def __init__(self, client: Client, job_id: str, submitted: JobSubmitted | None = None):
        self.client = client
        self.job_id = job_id
        self.submitted = submitted  # what POST /finetune answered (the dataset summary, the normalised config)

    def refresh(self) -> Job:
        return self.client.job(self.job_id)

    def cancel(self) -> Job:
        return self.client.cancel(self.job_id)

    def wait(self, timeout: float | None = None, interval: float = 1.0, on_progress: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job ends (succeeded, failed, cancelled, interrupted); → the final Job.
        `on_progress(job)` sees every poll; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.refresh()
            if on_progress is not None:
                on_progress(job)
            if job.state in ENDED_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {job.state} after {timeout} s")
            time.sleep(interval)


# ---- request parts -------------------------------------------------------------------------------
def _fields(**values: Any) -> dict[str, str]:
    """Form fields that were given (None: left out, so the server uses its default)."""
    return {key: str(value) for key, value in values.items() if value is not None}


def _image_part(image: Image) -> tuple[str, bytes | BinaryIO, str]:
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image), "application/octet-stream"
    if hasattr(image, "save"):  # a PIL image: sent losslessly as PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")


class _dataset_upload:
    """`files=` for a dataset: a .zip streamed from disk, a folder zipped to a temporary file first, or none."""

    def __init__(self, data: str | Path | None):
        self.data = Path(data) if data is not None else None
        self._stack = ExitStack()

    def __enter__(self) -> dict[str, tuple[str, BinaryIO, str]]:
        if self.data is None:
            return {}
        if self.data.is_dir():
            scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="tuneserve-upload-")))
            archive = zip_folder(self.data, scratch / f"{self.data.name or 'data'}.zip")
        elif self.data.suffix.lower() == ".zip" and self.data.is_file():
            archive = self.data
        else:
            raise ClientError(f"{self.data}: give a folder of labelled images or a .zip of one")
        handle = self._stack.enter_context(archive.open("rb"))
        return {"dataset": (archive.name, handle, "application/zip")}

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def zip_folder(folder: Path, destination: Path) -> Path:
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                bundle.write(path, path.relative_to(folder).as_posix())
    return destination
