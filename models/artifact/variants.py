"""Which precision of a model version to serve: `TUNESERVE_PRECISION=auto|fp32|int8|fp16`.

- `fp32`: always `model.onnx`.
- `int8`: `model.int8.onnx` when the version has one (on a GPU it runs as a QDQ graph on the CUDA
  or TensorRT provider); versions without one are served fp32, with the reason recorded.
- `fp16`: on a GPU, `model.onnx` converted to fp16 at load; on CPU fp32, because ONNX Runtime's
  CPU provider has no fast fp16 kernels.
- `auto`: on a GPU fp16; on CPU int8 when the version's int8 variant passed the accuracy gate
  (`int8_gate`), else fp32.

Pure logic over the manifest, so every device × setting is testable on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.artifact.manifest import ONNX_FILE, Manifest, Variant

PRECISIONS = ("auto", "fp32", "int8", "fp16")
# auto serves int8 only when it costs at most half a point of test accuracy.
MAX_INT8_ACCURACY_DROP = 0.005


@dataclass(frozen=True)
class VariantChoice:
    variant: str  # fp32 | int8 | fp16: what the responses name
    file: str  # the graph file to load
    reason: str

    @property
    def convert_fp16(self) -> bool:
        return self.variant == "fp16"


def int8_gate(variant: Variant | None, max_drop: float = MAX_INT8_ACCURACY_DROP) -> tuple[bool, str]:
    """Whether `auto` may serve this int8 variant, and why (or why not).

    Without labels the drop is unknown; the share of images whose top-1 changed bounds it from
    above, so that bound has to meet the same limit.
    """
    if variant is None:
        return False, "no int8 variant (tuneserve quantize NAME:VERSION makes one)"
    if variant.accuracy_delta is not None:
        drop = -variant.accuracy_delta
        verdict = "within" if drop <= max_drop + 1e-9 else "over"
        return drop <= max_drop + 1e-9, (
            f"int8 test accuracy drop {drop * 100 + 0.0:.2f} points {verdict} the {max_drop * 100:.1f}-point gate"
        )
    changed = 1.0 - variant.agreement
    verdict = "within" if changed <= max_drop + 1e-9 else "over"
    return changed <= max_drop + 1e-9, (
        f"unlabelled test images: int8 changes top-1 on {changed * 100:.2f}% of them, {verdict} the "
        f"{max_drop * 100:.1f}% gate"
    )


def check_precision(precision: str) -> str:
    value = (precision or "auto").strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return value


def choose_variant(manifest: Manifest, precision: str, on_gpu: bool) -> VariantChoice:
    """The variant to serve for `precision` on this device (see the module docstring)."""
    precision = check_precision(precision)
    int8 = manifest.variants.get("int8")
    fp32 = VariantChoice("fp32", ONNX_FILE, "")
    if precision == "fp32":
        return VariantChoice("fp32", ONNX_FILE, "fp32 requested")
    if precision == "int8":
        if int8 is None:
            return VariantChoice("fp32", ONNX_FILE, "int8 requested, but this version has no int8 variant; serving fp32")
        return VariantChoice("int8", int8.file, "int8 requested")
    if on_gpu:
        return VariantChoice("fp16", ONNX_FILE, f"{precision} on a GPU: fp16, converted at load")
    if precision == "fp16":
        return VariantChoice("fp32", ONNX_FILE, "fp16 requested, but ONNX Runtime on CPU has no fast fp16 kernels; serving fp32")
    passed, why = int8_gate(int8)
    if passed:
        return VariantChoice("int8", int8.file, f"auto on CPU: {why}")
    return VariantChoice(fp32.variant, fp32.file, f"auto on CPU: {why}; serving fp32")
