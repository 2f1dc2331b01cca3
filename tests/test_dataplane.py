"""The data plane in process (no HTTP): one batcher pass per image with every asked output, one
top-k and one decision, one rule for min_confidence, per-image errors, and /evaluate's bound model."""
import asyncio

import numpy as np
import pytest

from models.serving.decision import InvalidMinConfidence
from models.errors import EmbeddingUnavailable, ImageError
from tests.tiny import solid_png, write_tiny_model, write_trusted_tiny_model

COLOURS = [(220, 40, 60), (40, 200, 60), (40, 70, 210), (120, 100, 110)]


def _pixels() -> np.ndarray:
    return np.stack([np.full((16, 16, 3), colour, np.uint8) for colour in COLOURS])


def _run(bento_home, tmp_path, scenario):
    from models.artifact import store
    from service.config import Settings
    from service.dataplane import DataPlane
    from service.pool import ModelPool

    store.publish("trusted", write_trusted_tiny_model(tmp_path / "trusted", tmp_path / "fit"))
    store.publish("plain", write_tiny_model(tmp_path / "plain"))
    settings = Settings.of(home=tmp_path / "home", auth=False, default_model="trusted", workers=1, device="cpu")

    async def main():
        pool = ModelPool(settings)
        plane = DataPlane(pool, settings)
        try:
            return await scenario(plane)
        finally:
            await pool.stop()
            await plane.close()

    return asyncio.run(main())


def test_one_pass_for_every_output_and_the_decision(bento_home, tmp_path):
    from service.dataplane import InferenceRequest

    async def scenario(plane):
        classifier = await plane.resolve("trusted")
        seen = []
        run = classifier.run
        classifier.run = lambda batch, outputs: seen.append((len(batch), tuple(outputs))) or run(batch, outputs)
        asked = InferenceRequest(model=classifier, pixels=_pixels(), outputs=frozenset({"probabilities", "logits", "embedding"}),
                                 top_k=2, min_confidence="auto", id="r1")
        return classifier, seen, await plane.infer(asked)

    classifier, seen, result = _run(bento_home, tmp_path, scenario)
    assert sum(size for size, _ in seen) == len(COLOURS)  # each image ran once, logits and all, through the batcher
    assert all(set(outputs) == set(classifier.manifest.output_names) | {classifier.manifest.embedding_output} for _, outputs in seen)
    assert result.id == "r1" and result.version == classifier.version and not result.failed
    logits, probabilities = result.stacked("logits"), result.stacked("probabilities")  # calibrated: softmax(logits / T)
    assert logits.shape == probabilities.shape == (len(COLOURS), 3)
    assert (np.argsort(-logits, 1) == np.argsort(-probabilities, 1)).all()
    for image in result.images:
        ranked = [classifier.manifest.labels[i] for i in image.ranked]
        assert [p.label for p in image.prediction.predictions] == ranked and len(ranked) == 2
        assert image.prediction.in_domain == pytest.approx(image.in_domain, abs=1e-4)
        assert image.prediction.abstained is (image.prediction.label is None)
    assert result.stacked("embedding").shape == (len(COLOURS), 3)


def test_min_confidence_rule_errors_and_bound_model(bento_home, tmp_path):
    from service.dataplane import BoundModel, InferenceRequest, min_confidence_of

    async def scenario(plane):
        trusted, plain = await plane.resolve("trusted"), await plane.resolve("plain")
        for good, parsed in ((None, None), ("", None), ("auto", "auto"), ("0.5", 0.5), (0.25, 0.25), (1, 1.0)):
            assert min_confidence_of(good, trusted) == parsed
        for bad in ("AUTO", " 0.5", "sure", True, 1.5, [0.5]):
            with pytest.raises(InvalidMinConfidence):
                min_confidence_of(bad, trusted)
        with pytest.raises(InvalidMinConfidence, match="no per-label thresholds"):
            min_confidence_of("auto", plain)
        with pytest.raises(EmbeddingUnavailable):
            await plane.infer(InferenceRequest(model=plain, pixels=_pixels(), outputs=frozenset({"embedding"})))
        images = [solid_png(COLOURS[0]), b"not an image", solid_png(COLOURS[2])]
        partial = await plane.infer(InferenceRequest(model=trusted, images=images, top_k=1, partial=True))
        whole = await plane.infer(InferenceRequest(model=trusted, images=images, top_k=1))
        loop = asyncio.get_running_loop()
        bound = BoundModel(plane, trusted, loop)
        names = list(trusted.manifest.output_names)
        via_plane = await asyncio.to_thread(bound.run, _pixels(), names)
        return partial, whole, via_plane, trusted.run(_pixels(), names), bound.tag == trusted.tag

    partial, whole, via_plane, direct, same_tag = _run(bento_home, tmp_path, scenario)
    assert [image.error is None for image in partial.images] == [True, False, True]
    assert isinstance(partial.images[1].error, ImageError) and partial.images[0].prediction.label == "red"
    assert [index for index, _ in whole.failed] == [1] and whole.images[0].prediction is None  # nothing ran
    assert same_tag and all(np.allclose(a, b, atol=1e-6) for a, b in zip(via_plane, direct))
