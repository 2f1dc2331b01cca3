"""BentoML 1.4 the way its docs show it: one service class, an adaptive-batching API on PIL images.

    PEER_MODEL_DIR=<version dir> bentoml serve bentoml_app:Classify --port 3001   (cwd: bench/peers)

`batchable=True` makes BentoML collect requests into one list (adaptive batching); a batchable API
takes one parameter, here the images, and a request carries a list of one. BentoML decodes the
multipart field into `PIL.Image.Image`; errors inside the batch surface as BentoML reports them.
"""
from __future__ import annotations

import bentoml
from PIL.Image import Image

from common import Classifier, setting


@bentoml.service(workers=int(setting("WORKERS", "2")), resources={"cpu": "1"}, traffic={"timeout": 60})
class Classify:
    def __init__(self) -> None:
        self.model = Classifier()

    # max_latency_ms is a deadline (later requests get 503), not a wait window: BentoML's default
    # keeps it out of the way, as no other peer refuses work; the dispatcher picks the wait itself.
    @bentoml.api(batchable=True, max_batch_size=int(setting("MAX_BATCH", "32")),
                 max_latency_ms=int(setting("BENTOML_MAX_LATENCY_MS", "60000")))
    def classify(self, image: list[Image]) -> list[dict]:
        probabilities = self.model.predict([self.model.preprocess(item) for item in image])
        return [{"predictions": self.model.top5(row)} for row in probabilities]
