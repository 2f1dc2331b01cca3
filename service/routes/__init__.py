"""HTTP routes, one module per area; each exposes `build_router(settings) -> APIRouter`.

service/app.py includes them into the FastAPI app that service/service.py mounts in BentoML.
"""
