"""LitServe the way its docs show it: a LitAPI with batching, served by LitServer on CPU.

    PEER_MODEL_DIR=<version dir> PEER_PORT=3002 python litserve_app.py   (cwd: bench/peers)

`max_batch_size` and `batch_timeout` belong to the LitAPI (LitServer's arguments of the same name
are deprecated); `workers_per_device=2` on the CPU "device" gives two inference processes, and
`run()` starts as many HTTP server processes as there are inference workers by default.
A multipart upload reaches `decode_request` as the form's UploadFile; decoding runs in the
inference worker, once per request of the batch.
"""
from __future__ import annotations

import litserve as ls

from common import Classifier, setting


class ClassifyAPI(ls.LitAPI):
    def setup(self, device):
        self.model = Classifier()

    def decode_request(self, request):
        return self.model.decode(request["image"].file.read())

    def predict(self, x):
        # LitAPI.batch stacks the decoded arrays; the Classifier stacks a list as well
        return self.model.predict(list(x))

    def encode_response(self, output):
        return {"predictions": self.model.top5(output)}


if __name__ == "__main__":
    api = ClassifyAPI(max_batch_size=int(setting("MAX_BATCH", "32")),
                      batch_timeout=float(setting("BATCH_TIMEOUT_S", "0.01")), api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=int(setting("WORKERS", "2")))
    server.run(host="127.0.0.1", port=int(setting("PORT", "8000")), generate_client_file=False)
