"""Fast service tests without a server: settings, provider choice, GPU binding, batching, packaging."""
from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from models.serving.runtime import CPU, CUDA, TENSORRT, RuntimeOptions, select_providers
from service.config import SettingsError, load_settings


# ---- settings --------------------------------------------------------------------------------
def test_settings_defaults(tmp_path):
    settings = load_settings({"BENTOML_HOME": str(tmp_path)})
    assert settings.home == (tmp_path / "tuneserve").resolve()
    assert settings.data_root == settings.home / "data"
    assert settings.default_model == "imagenet"
    assert settings.max_body_bytes == 20 * 1024 * 1024
    assert settings.max_batch == 64 and settings.poll_seconds == 2.0
    assert settings.max_concurrent_jobs == 1 and settings.job_grace_seconds == 10
    assert settings.training_python == sys.executable
    assert settings.api_key is None and settings.public()["api_key"] is None


def test_settings_from_environment(tmp_path):
    settings = load_settings(
        {
            "TUNESERVE_HOME": str(tmp_path / "h"),
            "TUNESERVE_DEFAULT_MODEL": "digits:abc",
            "TUNESERVE_PRELOAD": "a, b",
            "TUNESERVE_API_KEY": "k",
            "TUNESERVE_MAX_BODY_MB": "1.5",
            "TUNESERVE_TENSORRT": "yes",
            "TUNESERVE_ALLOWED_FORMATS": "jpeg,png",
            "TUNESERVE_DEVICE": "CPU",
        }
    )
    assert settings.data_root == (tmp_path / "h" / "data").resolve()
    assert settings.models_to_load == ["digits:abc", "a", "b"]
    assert settings.max_body_bytes == int(1.5 * 1024 * 1024)
    assert settings.tensorrt is True and settings.device == "cpu"
    assert settings.allowed_formats == {"JPEG", "PNG"}
    assert settings.public()["api_key"] == "set"


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("TUNESERVE_MAX_BODY_MB", "lots", "expected a number"),
        ("TUNESERVE_MAX_BODY_MB", "0", "greater than 0"),
        ("TUNESERVE_MAX_BATCH", "1.5", "expected an integer"),
        ("TUNESERVE_DEVICE", "tpu", "auto, cpu, cuda"),
        ("TUNESERVE_FP16", "maybe", "true/false"),
        ("TUNESERVE_DEFAULT_MODEL", "Bad Name!", "invalid model name"),
        ("TUNESERVE_ALLOWED_FORMATS", "JPEG,XCF", "unsupported formats"),
        ("TUNESERVE_WORKERS", "-1", "at least 0"),
    ],
)
def test_settings_refuse_invalid_values(name, value, words):
    with pytest.raises(SettingsError) as error:
        load_settings({name: value})
    assert name in str(error.value) and words in str(error.value)


# ---- providers and GPU binding (CPU-only checks of the GPU logic) -----------------------------
ALL = [TENSORRT, CUDA, CPU]


def test_providers_cuda_when_a_gpu_is_visible():
    plan = select_providers(ALL, 2, RuntimeOptions(device_id=1))
    assert plan.names == [CUDA, CPU]
    assert plan.providers[0][1]["device_id"] == 1
    assert "not enabled" in plan.skipped[TENSORRT]


def test_providers_tensorrt_opt_in_with_fp16():
    plan = select_providers(ALL, 1, RuntimeOptions(enable_tensorrt=True, fp16=True, trt_cache_dir="/c"))
    assert plan.names == [TENSORRT, CUDA, CPU]
    assert plan.providers[0][1]["trt_fp16_enable"] is True
    assert plan.providers[0][1]["trt_engine_cache_path"] == "/c"


def test_providers_cpu_without_gpu_or_when_asked():
    plan = select_providers(ALL, 0, RuntimeOptions(enable_tensorrt=True))
    assert plan.names == [CPU]
    assert "no CUDA device" in plan.skipped[CUDA] and "no CUDA device" in plan.skipped[TENSORRT]
    plan = select_providers(ALL, 4, RuntimeOptions(device="cpu"))
    assert plan.names == [CPU] and "device=cpu" in plan.skipped[CUDA]
    plan = select_providers([CPU], 4, RuntimeOptions())
    assert plan.names == [CPU] and "not in this onnxruntime build" in plan.skipped[CUDA]
    with pytest.raises(RuntimeError, match="device=cuda"):
        select_providers(ALL, 0, RuntimeOptions(device="cuda"))
    plan = select_providers(ALL, 1, RuntimeOptions(device_id=3))
    assert plan.names == [CPU] and "only 1 GPU" in plan.skipped[CUDA]


def test_worker_binds_to_gpu_by_index(monkeypatch):
    from service.pool import devices

    monkeypatch.setattr(devices, "preload_cuda_libraries", lambda: None)
    settings = load_settings({"TUNESERVE_WORKERS": "4"})
    # circus worker ids start at 1: workers 1..4 over 2 GPUs → 0, 1, 0, 1
    assert [devices.runtime_options(settings, gpu_count=2, index=i).device_id for i in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert devices.runtime_options(settings, gpu_count=2, index=1).intra_op_threads == 1
    cpu = devices.runtime_options(settings, gpu_count=0, index=3)
    assert cpu.device_id == 0 and cpu.intra_op_threads >= 1
    pinned = devices.runtime_options(load_settings({"TUNESERVE_THREADS": "3"}), gpu_count=0, index=1)
    assert pinned.intra_op_threads == 3


def test_worker_count_defaults_to_gpus_else_cores(monkeypatch):
    import os

    import models.serving.runtime

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(models.serving.runtime, "cuda_device_count", lambda: 0)
    assert load_settings({}).worker_count == cores
    assert cpu_threads(load_settings({})) == 1  # one ONNX Runtime thread per worker on CPU
    monkeypatch.setattr(models.serving.runtime, "cuda_device_count", lambda: 3)
    assert load_settings({}).worker_count == 3
    assert load_settings({"TUNESERVE_WORKERS": "5"}).worker_count == 5


def cpu_threads(settings) -> int:
    from service.pool import devices

    return devices.runtime_options(settings, gpu_count=0, index=1).intra_op_threads


# ---- micro-batching ----------------------------------------------------------------------------
class FakeClassifier:
    def __init__(self, tag, fail=False):
        self.tag, self.name, self.fail, self.calls = tag, tag.split(":")[0], fail, []

    def predict_scored(self, batch):
        self.calls.append(len(batch))
        if self.fail:
            raise RuntimeError("boom")
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32), batch.reshape(len(batch), -1)[:, 0] / 100


def test_batcher_merges_requests_and_isolates_failures():
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import Batcher

    async def main():
        batcher = Batcher("m", max_size=8, max_latency_s=0.05, executor=ThreadPoolExecutor(1))
        good, bad = FakeClassifier("m:1"), FakeClassifier("m:2", fail=True)
        jobs = [batcher.submit(good, np.full((2, 2, 3), i, np.uint8)) for i in range(10)]
        jobs.append(batcher.submit(bad, np.zeros((2, 2, 3), np.uint8)))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.close()
        return good, bad, results

    good, bad, results = asyncio.run(main())
    assert [int(r[0][0]) for r in results[:10]] == list(range(10))  # each request gets its own row
    assert [r[1] for r in results[:10]] == [i / 100 for i in range(10)]  # and its own in-domain score
    assert isinstance(results[10], RuntimeError)  # the failing version fails only its own item
    assert max(good.calls) > 1 and sum(good.calls) == 10 and max(good.calls) <= 8


# ---- packaging -------------------------------------------------------------------------------
def test_bento_spec_models_serve_only_and_base_image():
    import yaml

    from tuneserve.serve_commands import ROOT, TRAINING_PACKAGES, bento_spec, requirement_name

    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    full = bento_spec(spec, ["imagenet:abc", "digits:def"])
    assert full["models"] == ["imagenet:abc", "digits:def"] and full["name"] == "tuneserve"
    assert TRAINING_PACKAGES <= {requirement_name(p) for p in full["python"]["packages"]}
    assert "base_image" not in full["docker"] and full["docker"]["distro"] == "debian"  # what a user with internet expects

    serve = bento_spec(spec, ["imagenet:abc"], serve_only=True, base_image="localbase:1")
    names = {requirement_name(p) for p in serve["python"]["packages"]}
    assert serve["name"] == "tuneserve-serve" and not names & TRAINING_PACKAGES
    assert {"onnxruntime-gpu", "bentoml", "ray"} <= names
    assert not any(item.startswith("training") for item in serve["include"])
    assert serve["docker"]["base_image"] == "localbase:1" and serve["docker"]["system_packages"] == ["libgomp1"]
    assert spec["models"] == [] and "torch==2.14.1" in spec["python"]["packages"]  # the input is not changed



def test_bento_spec_cpu_swaps_onnxruntime_and_drops_cuda():
    import pytest
    import yaml

    from models.errors import TuneserveError
    from tuneserve.serve_commands import ROOT, TRAINING_PACKAGES, bento_spec, requirement_name

    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu = bento_spec(spec, ["imagenet:abc"], serve_only=True)
    cpu = bento_spec(spec, ["imagenet:abc"], serve_only=True, cpu=True)
    names = {requirement_name(p) for p in cpu["python"]["packages"]}
    assert cpu["name"] == "tuneserve-serve-cpu" and cpu["labels"]["variant"] == "serve-only-cpu"
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names and not names & TRAINING_PACKAGES
    assert not any(name.startswith("nvidia-") for name in names) and "bentoml" in names
    assert not names & {"ray", "pyarrow"}  # replicas never import Ray; only `tuneserve score` writes Parquet
    assert cpu["docker"]["dockerfile_template"] == "docker/serve-slim.j2"  # no build-essential or git
    version = next(p for p in gpu["python"]["packages"] if requirement_name(p) == "onnxruntime-gpu").split("==")[1]
    assert f"onnxruntime=={version}" in cpu["python"]["packages"]  # the same ONNX Runtime release
    assert cpu["docker"]["env"]["TUNESERVE_DEVICE"] == "cpu" and "TUNESERVE_DEVICE" not in gpu["docker"]["env"]
    with pytest.raises(TuneserveError, match="--serve-only"):
        bento_spec(spec, [], cpu=True)  # torch's default wheel carries CUDA: CPU images are serving images


def test_bentofile_installs_every_project_dependency():
    """The image installs what pyproject.toml declares (a package added to one list only breaks
    the container at start, not any test that runs from the venv)."""
    import tomllib

    import yaml

    from tuneserve.serve_commands import ROOT, requirement_name

    declared = {requirement_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    bento = {requirement_name(p) for p in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]}
    # onnxruntime (plain) is pyproject's choice off linux x86_64; images are linux x86_64 (--cpu swaps it in)
    assert declared - {"onnxruntime"} <= bento, sorted(declared - {"onnxruntime"} - bento)

# ---- body limit middleware -------------------------------------------------------------------
def test_body_limit_middleware_per_path():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.limits import BodyLimitMiddleware

    async def echo(request):
        return JSONResponse({"size": len(await request.body())})

    app = Starlette(routes=[Route("/classify", echo, methods=["POST"]), Route("/finetune", echo, methods=["POST"])])
    wrapped = BodyLimitMiddleware(app, max_bytes=100, overrides={"/finetune": 1000})
    client = TestClient(wrapped)
    assert client.post("/classify", content=b"x" * 100).json() == {"size": 100}
    refused = client.post("/classify", content=b"x" * 101)
    assert refused.status_code == 413 and "TUNESERVE_MAX_BODY_MB" in refused.json()["error"]
    assert client.post("/finetune", content=b"x" * 500).json() == {"size": 500}
    refused = client.post("/finetune", content=b"x" * 1001)
    assert refused.status_code == 413 and "TUNESERVE_FINETUNE_MAX_UPLOAD_MB" in refused.json()["error"]
    streamed = client.post("/classify", content=iter([b"x" * 60, b"x" * 60]))  # chunked, no Content-Length
    assert streamed.status_code == 413


def test_pinned_versions_are_capped_and_the_newest_is_kept(bento_home, tmp_path):
    from models.artifact import store
    from models.errors import ModelNotFound
    from service.pool import ModelPool
    from tests.tiny import write_tiny_model

    versions = [store.publish("colours", write_tiny_model(tmp_path / f"v{i}")) for i in range(4)]
    settings = load_settings({"BENTOML_HOME": str(bento_home), "TUNESERVE_DEFAULT_MODEL": "colours",
                              "TUNESERVE_MAX_LOADED_MODELS": "3"})

    async def scenario():
        pool = ModelPool(settings)
        latest = await pool.get("colours")
        pinned = [await pool.get(v.tag) for v in versions[:3]]
        again = await pool.get(versions[2].tag)
        for bad in ("nope", "nope:v1", "colours:zzz"):
            with pytest.raises(ModelNotFound):
                await pool.get(bad)
        await pool.stop()
        return pool, latest, pinned, again

    pool, latest, pinned, again = asyncio.run(scenario())
    assert latest.version == versions[3].version
    assert again is pinned[2]  # the newest pinned version stayed loaded
    assert list(pool._pinned) == [versions[1].tag, versions[2].tag]  # 3 loaded in all: latest + 2 pinned
    assert set(pool._locks) <= {"colours", *pool._pinned}  # unknown refs leave no locks behind
