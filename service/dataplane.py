"""The data plane: every inference the service makes goes through one call.

    result = await plane.infer(InferenceRequest(model="name[:version]", images=[jpeg, ...],
                                                outputs={"probabilities"}, top_k=5, min_confidence="auto"))

Entry point for request ids, capture and canary routing: `DataPlane.infer(InferenceRequest) ->
InferenceResult`. Model routing happens once per request in `DataPlane.resolve` (a `name`,
`name:version`, or an already resolved classifier); `InferenceRequest.id` is echoed in the result.

One call does, in order: parse `min_confidence` (the one rule for every surface), resolve the
model, decode the encoded images in a thread pool (or take uint8 pixels at the model's size), one
pass per image through the model's micro-batcher (service/batching.py, every asked output in that pass),
then one top-k and one decision (models/serving/decision.py) per image. The protocol endpoints
(/classify, /classify_batch, /v2 over REST, the OIP over gRPC, /evaluate's inference) only
translate their wire format into an `InferenceRequest` and the `InferenceResult` back, as KServe's
protocol layer does over its DataPlane. No HTTP here.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from models.serving.decision import AUTO, InvalidMinConfidence, MinConfidence, check_supported, decide, parse_min_confidence
from models.errors import ImageError, TuneserveError
from models.serving.preprocess import decode_image, resize_and_crop
from models.serving.runtime import OnnxClassifier, default_threads
from service.loop.plane import loop_for
from service.names import caller_id
from service.admission import Admission
from service.batching import EXTRAS, Batchers, QueueLimits, Row
from service.pool import ModelPool, observe
from service.schemas import Prediction

OUTPUTS = ("probabilities", "logits", "embedding", "evidence")


class InvalidInput(TuneserveError):
    """Input tensors the model cannot take (wrong dtype or shape)."""

    status = 400


@dataclass(frozen=True)
class InferenceRequest:
    """What a caller asks of one model for a batch of images (send `images` or `pixels`)."""

    model: str | OnnxClassifier | None = None  # "name" (its latest), "name:version"; None: the default model
    images: Sequence[bytes] = ()  # encoded images (JPEG, PNG, …), decoded and resized here
    pixels: np.ndarray | None = None  # or uint8 [N, S, S, 3], already at the model's size S
    outputs: frozenset[str] = frozenset({"probabilities"})  # any of OUTPUTS
    top_k: int = 0  # ranked labels (and the decision) per image; 0: none
    min_confidence: Any = None  # a number in [0, 1], "auto", or None; parsed by `min_confidence_of`
    partial: bool = False  # True: an image that cannot be decoded fails alone; False: no inference at all
    id: str | None = None  # the caller's request id, echoed in the result


@dataclass
class ImageResult:
    """One image's answer, or its `error` (a 4xx naming the problem)."""

    probabilities: np.ndarray | None = None  # [C]
    logits: np.ndarray | None = None  # [C]
    embedding: np.ndarray | None = None  # [D]
    evidence: np.ndarray | None = None  # [C, side, side]: each class's evidence map (models/serving/evidence.py)
    pixels: np.ndarray | None = None  # the uint8 crop the model saw, kept only when evidence was asked (overlays)
    in_domain: float | None = None
    ranked: np.ndarray | None = None  # label indices of the top k, most probable first
    prediction: Prediction | None = None  # top-k and decision, when top_k > 0
    error: TuneserveError | None = None


@dataclass
class InferenceResult:
    """The answer to one `InferenceRequest`: which version answered, and one `ImageResult` per image."""

    classifier: OnnxClassifier
    images: list[ImageResult]
    id: str | None = None
    min_confidence: MinConfidence = None
    elapsed_s: float = 0.0
    request_ids: list[str] = field(default_factory=list)  # one per image of a classification (POST /feedback)

    @property
    def model(self) -> str:
        return self.classifier.name

    @property
    def version(self) -> str:
        return self.classifier.version

    @property
    def variant(self) -> str:
        return self.classifier.variant

    @property
    def failed(self) -> list[tuple[int, TuneserveError]]:
        return [(index, image.error) for index, image in enumerate(self.images) if image.error is not None]

    def stacked(self, output: str) -> np.ndarray:
        """`output` of every image as one array `[N, ...]` (every image must have succeeded)."""
        return np.stack([getattr(image, output) for image in self.images])


def min_confidence_of(raw: Any, classifier: OnnxClassifier) -> MinConfidence:
    """The one rule for `min_confidence` on every surface: absent/empty → None; exactly "auto"; or a
    number in [0, 1] (a JSON number, or its text from a form). `auto` needs the version's thresholds."""
    if isinstance(raw, str):
        canonical = raw == raw.strip() and (raw == AUTO or raw.lower() != AUTO)  # no " 0.5", no "AUTO"
    else:
        canonical = raw is None or (isinstance(raw, (int, float)) and not isinstance(raw, bool))
    if not canonical:
        raise InvalidMinConfidence(f"min_confidence must be a number in [0, 1] or 'auto', got {raw!r}")
    value = parse_min_confidence(raw)
    check_supported(value, classifier.manifest, classifier.tag)
    return value


class DataPlane:
    """The inference of one serving worker: models from its `ModelPool` (the registry), images through
    its own micro-batchers."""

    def __init__(self, pool: ModelPool, settings, admission: Admission | None = None):
        self.pool = pool
        self.settings = settings
        self.loop = loop_for(settings)  # the production loop: routing, request ids, feedback, capture, drift
        threads = settings.decode_threads or default_threads(settings.worker_count)
        self._decode = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")
        self.batchers = Batchers(settings.batch_max_size, settings.batch_max_latency_ms / 1000.0, QueueLimits(
            settings.max_queued_images, settings.request_deadline_s, settings.retry_after_s))
        # inference requests in flight in this worker, HTTP and gRPC together (service/admission.py)
        self.admission = admission or Admission(settings.max_inflight_requests, settings.retry_after_s)

    async def close(self) -> None:
        await self.batchers.close()
        self._decode.shutdown(wait=False, cancel_futures=True)

    # ---- the entry point ---------------------------------------------------------------------
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """One request → one result; see the module docstring for the steps."""
        started = time.perf_counter()
        caller_id(request.id)  # echoed only; records are keyed by the server's ids (service/names.py)
        classifier = await self.resolve(request.model)
        min_confidence = min_confidence_of(request.min_confidence, classifier)
        asked = request
        request = replace(request, outputs=self.loop.outputs_for(asked.outputs, classifier, asked.top_k))
        extras = self._extras(request, classifier)
        arrays = await self._inputs(request, classifier)
        images = [ImageResult(error=a) if isinstance(a, TuneserveError) else None for a in arrays]
        if request.partial or all(image is None for image in images):
            rows = await gathered([self.batchers.submit(classifier, a, extras) for a, image in zip(arrays, images) if image is None])
            answered = iter(rows)
            images = [image or self._answer(classifier, next(answered), request, min_confidence) for image in images]
        else:
            images = [image or ImageResult() for image in images]
        if "evidence" in request.outputs:  # overlays are drawn on what the model saw
            for image, array in zip(images, arrays):
                image.pixels = None if image.error is not None else array
        result = InferenceResult(classifier, images, request.id, min_confidence, time.perf_counter() - started)
        self.loop.ensure_worker(self.pool, self.batchers)
        self.loop.after(asked.outputs, asked.top_k, asked.images or asked.pixels, result)
        return result

    async def resolve(self, model: str | OnnxClassifier | None) -> OnnxClassifier:
        """The classifier that answers: the one given, or the pool's for a name / name:version."""
        if isinstance(model, OnnxClassifier):
            return model
        return await self.pool.get(self.loop.route(model))  # an un-pinned name: by its rollout, if any

    # ---- steps -------------------------------------------------------------------------------
    @staticmethod
    def _extras(request: InferenceRequest, classifier: OnnxClassifier) -> frozenset[str]:
        unknown = set(request.outputs) - set(OUTPUTS)
        if unknown:
            raise InvalidInput(f"unknown outputs {sorted(unknown)}; this model gives {list(OUTPUTS)}")
        if "embedding" in request.outputs:
            classifier.require_embedding("the embedding output")
        if "evidence" in request.outputs:
            classifier.require_evidence()
        return frozenset(request.outputs) & frozenset(EXTRAS)

    async def _inputs(self, request: InferenceRequest, classifier: OnnxClassifier) -> list[np.ndarray | TuneserveError]:
        """uint8 `[S, S, 3]` per image, or the image's error."""
        if (request.pixels is None) == (not request.images):
            raise InvalidInput("send either encoded images or uint8 pixels, not both or neither")
        if request.pixels is not None:
            return list(checked_pixels(request.pixels, classifier.manifest.preprocessing.size))
        return await gathered([self._decode_one(data, classifier) for data in request.images])

    async def _decode_one(self, data: bytes, classifier: OnnxClassifier) -> np.ndarray | ImageError:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decode, self._decode_sync, data, classifier)
        except ImageError as error:
            return error

    def _decode_sync(self, data: bytes, classifier: OnnxClassifier) -> np.ndarray:
        started = time.perf_counter()
        spec = classifier.manifest.preprocessing
        image = decode_image(data, self.settings.max_pixels, self.settings.allowed_formats, draft_size=spec.resize)
        array = resize_and_crop(image, spec)
        observe("decode", classifier.name, time.perf_counter() - started)
        return array

    @staticmethod
    def _answer(classifier: OnnxClassifier, row: Row, request: InferenceRequest, min_confidence: MinConfidence) -> ImageResult:
        """The asked outputs of one image, its top-k and its decision."""
        asked = request.outputs
        result = ImageResult(
            probabilities=row.probabilities if "probabilities" in asked else None,
            logits=row.logits if "logits" in asked else None,
            embedding=row.embedding if "embedding" in asked else None,
            evidence=row.evidence if "evidence" in asked else None,
            in_domain=row.in_domain,
        )
        if request.top_k > 0:
            result.ranked = top_indices(row.probabilities, request.top_k)
            result.prediction = prediction_of(classifier, row.probabilities, result.ranked, min_confidence, row.in_domain)
        return result


async def gathered(calls: list) -> list:
    """The results of `calls`, run together; one call is awaited directly (no task to schedule:
    the common single-image request takes one event-loop turn less per step)."""
    if len(calls) == 1:
        return [await calls[0]]
    return list(await asyncio.gather(*calls))


def top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The k most probable label indices, most probable first (ties keep label order)."""
    return np.argsort(-probabilities, kind="stable")[: min(k, len(probabilities))]


def prediction_of(classifier: OnnxClassifier, probabilities: np.ndarray, ranked: np.ndarray,
                  min_confidence: MinConfidence, in_domain: float | None) -> Prediction:
    labels = classifier.manifest.labels
    top = [{"label": labels[i], "probability": float(probabilities[i])} for i in ranked]
    decided = decide(classifier.manifest, top, min_confidence, in_domain)
    return Prediction(**decided, model=classifier.name, version=classifier.version, variant=classifier.variant)


def checked_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[N, size, size, 3]` with N ≥ 1, or InvalidInput naming the shape expected."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3) or not len(pixels):
        raise InvalidInput(f"UINT8 images must have shape [N, {size}, {size}, 3] (the model's size), "
                           f"got {pixels.dtype} {list(pixels.shape)}")
    return pixels


class BoundModel:
    """A classifier whose `run` goes through the data plane (its batcher), for code that runs in a
    worker thread and expects `OnnxClassifier.run(batch, output_names)`, e.g. models/data/evaluate.py."""

    def __init__(self, plane: DataPlane, classifier: OnnxClassifier, loop: asyncio.AbstractEventLoop):
        self._plane, self._classifier, self._loop = plane, classifier, loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._classifier, name)

    def run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        manifest = self._classifier.manifest
        ours = {manifest.output_names[0]: "logits", manifest.output_names[1]: "probabilities",
                manifest.embedding_output: "embedding"}
        request = InferenceRequest(model=self._classifier, pixels=batch, outputs=frozenset(ours[n] for n in outputs))
        result = asyncio.run_coroutine_threadsafe(self._plane.infer(request), self._loop).result()
        return [result.stacked(ours[name]) for name in outputs]

