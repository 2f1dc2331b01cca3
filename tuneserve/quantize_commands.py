"""`tuneserve quantize NAME[:VERSION]`: add a static INT8 variant to a stored version (torch-free)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

QUANTIZE_HELP = """\
Write model.int8.onnx next to a stored version's model.onnx: ONNX Runtime static quantization
(QDQ, per-channel int8 weights, uint8 activations), calibrated on training images through the
serving preprocessing with MinMax, Entropy and Percentile, keeping the best on validation. The
kept graph is compared with fp32 on the test split; eval.json (variants.int8) and the manifest
(variants.int8) record the result, and serving's TUNESERVE_PRECISION=auto uses it on CPU when
test accuracy drops by at most 0.5 points. Running servers pick it up when they next load the
version (a restart, or the next version).

DATA defaults to the data the version was trained on (its manifest records the path, fractions
and seed, so the same test split is held out). Images whose labels are not the model's (or no
labels, e.g. photos for the imagenet model) are split by seed into calibration, validation and
test parts and compared with fp32 by top-1 agreement only.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="add a static INT8 variant (model.int8.onnx) to a stored model version",
                              description=QUANTIZE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="name or name:version (default version: latest)")
    p.add_argument("--data", type=Path, help="folder, manifest or zip (default: the version's training data)")
    p.add_argument("--methods", default="minmax,entropy,percentile",
                   help="calibration methods to try, comma-separated (default: all three)")
    p.add_argument("--calibration-images", type=int, default=300, help="training images to calibrate on (default 300)")
    p.set_defaults(handler=run_quantize)


def training_data(manifest, override: Path | None) -> Path:
    """The data to calibrate on: `--data`, else the path the version's training recorded."""
    from models.artifact.quantize_inputs import QuantizeError

    if override is not None:
        return override
    recorded = (manifest.training or {}).get("data")
    if not recorded:
        raise QuantizeError("this version records no training data (e.g. the bootstrapped imagenet model); "
                            "pass --data with images to calibrate on")
    if not Path(recorded).exists():
        raise QuantizeError(f"the data this version was trained on is gone ({recorded}); pass --data")
    return Path(recorded)


def run_quantize(args: argparse.Namespace) -> int:
    import tempfile

    from models.artifact import store
    from models.data.datasets import load_samples, safe_extract_zip
    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples
    from models.artifact.variants import int8_gate

    config = QuantizeConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                            calibration_images=args.calibration_images).validate()
    version = store.resolve(args.model)
    manifest = version.manifest()
    with tempfile.TemporaryDirectory(prefix="tuneserve-quantize-data-") as scratch:
        path = training_data(manifest, args.data)
        if path.is_file() and path.suffix.lower() == ".zip":
            path = safe_extract_zip(path, scratch)
        data = data_from_samples(load_samples(path, require_labels=False), manifest, config)
        variant = quantize_version(version.path, data, config)
    served, why = int8_gate(variant)
    print(json.dumps({"model": version.tag, "int8": variant.model_dump(), "auto_serves_int8_on_cpu": served,
                      "gate": why}, indent=2))
    return 0
