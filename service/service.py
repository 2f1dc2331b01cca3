"""The BentoML 1.4 service: `bentoml serve service.service:TuneServe`.

Every route lives in the FastAPI app from service/app.py (routes in service/routes/), mounted with `@bentoml.asgi_app`, so
uploads are decoded and validated by our code (BentoML's PIL/File parameters 500 on corrupt input
and fetch URLs). BentoML supplies the server, workers, /healthz /livez /readyz /metrics.
Batching happens inside each worker per model (service/batching.py): BentoML's batchable APIs
take exactly one parameter and fail a whole batch if one item raises, which cannot carry `model`
and `top_k` per request.
"""
from __future__ import annotations

import logging

import bentoml

from service.admission import Admission, AdmissionMiddleware
from service.app import create_app, mount_jobs
from service.config import load_settings
from service.console import mount_console
from service.limits import BodyLimitMiddleware

log = logging.getLogger("tuneserve.service")
logging.getLogger("tuneserve").setLevel(logging.INFO)  # provider choices and hot reloads reach the server log

SETTINGS = load_settings()


app = create_app(SETTINGS)
mount_console(app)
# This worker process's inference requests in flight, shared by the HTTP middleware and gRPC
ADMISSION = Admission(SETTINGS.max_inflight_requests, SETTINGS.retry_after_s)


@bentoml.service(
    name="tuneserve",
    workers=SETTINGS.worker_count,
    traffic={"timeout": 600},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # one logical GPU per worker is chosen in service/pool/devices.py by worker index
)
@bentoml.asgi_app(app, path="/")
class TuneServe:
    """One instance per worker process."""

    def __init__(self) -> None:
        from service.dataplane import DataPlane
        from service.pool import ModelPool
        from service.storage import prepare_state

        self.settings = SETTINGS
        # before any job starts: children must see the bento's baked models (models/artifact/store.py)
        self.state_warnings = prepare_state(SETTINGS.home)
        self.pool = ModelPool(SETTINGS)
        self.dataplane = DataPlane(self.pool, SETTINGS, ADMISSION)  # every inference of this worker, HTTP and gRPC
        app.state.pool, app.state.dataplane = self.pool, self.dataplane
        self.grpc = None  # this worker's OIP gRPC server (service/oip/grpc_server.py), from startup on
        # ---- fine-tune jobs (service/finetune) ------------------------------------------
        # One JobManager per worker; its routes join the REST app. Absent package → no /finetune.
        self.jobs = getattr(app.state, "jobs", None)
        if self.jobs is None:
            self.jobs = mount_jobs(app, SETTINGS)
            app.state.jobs = self.jobs
        # ---------------------------------------------------------------------------------

    @bentoml.on_startup
    async def _start(self) -> None:
        from service.oip.grpc_server import start_grpc

        await self.pool.start()
        self.grpc = await start_grpc(self.dataplane, SETTINGS)
        if self.jobs is not None:
            self.jobs.start()

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace=2)
        await self.pool.stop()
        await self.dataplane.close()

    def __is_ready__(self) -> bool:
        return self.pool.ready()


# Overload is refused before anything else reads the request (service/admission.py).
TuneServe.add_asgi_middleware(AdmissionMiddleware, admission=ADMISSION)
# Body limit on every route; /finetune (dataset uploads) has its own, larger one.
TuneServe.add_asgi_middleware(
    BodyLimitMiddleware,
    max_bytes=SETTINGS.max_body_bytes,
    overrides={"/finetune": SETTINGS.finetune_max_upload_bytes},
)
