"""Ray Serve the way its docs show it: a deployment with a FastAPI ingress and `@serve.batch`.

    PEER_MODEL_DIR=<version dir> PEER_PORT=3003 python ray_app.py   (cwd: bench/peers)

Two replicas of one CPU each. The endpoint decodes its own upload, then awaits the batched
model call, as the docs' image examples do. `max_ongoing_requests` is raised to the batch size
because Ray warns that a replica never fills a batch otherwise (its default is 5).
Run as a script rather than `serve run` only to pick the HTTP port and a private local cluster.
No `from __future__ import annotations`: FastAPI must resolve `UploadFile` inside the class.
"""
import numpy as np
from fastapi import FastAPI, File, UploadFile
from ray import serve

from common import Classifier, setting

MAX_BATCH = int(setting("MAX_BATCH", "32"))
api = FastAPI()


@serve.deployment(num_replicas=int(setting("WORKERS", "2")), ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=MAX_BATCH)
@serve.ingress(api)
class Classify:
    def __init__(self) -> None:
        self.model = Classifier()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=float(setting("BATCH_TIMEOUT_S", "0.01")))
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        return [{"predictions": self.model.top5(row)} for row in self.model.predict(images)]

    @api.post("/classify")
    async def classify(self, image: UploadFile = File(...)) -> dict:
        return await self.predict(self.model.decode(await image.read()))


app = Classify.bind()

if __name__ == "__main__":
    import ray

    # a cluster of its own (never one that other work on this machine started), no dashboard
    ray.init(address="local", include_dashboard=False, _temp_dir=setting("RAY_TMP", "/tmp/ray-peers"))
    serve.start(http_options={"host": "127.0.0.1", "port": int(setting("PORT", "8000"))})
    serve.run(app, blocking=True)
