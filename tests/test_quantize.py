"""INT8 variants: quantization of a tiny conv model, the precision choice per device × setting,
the accuracy gate, and the variant named by serving, scoring and the CLI (all on CPU, no torch)."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.artifact.manifest import INT8_FILE, Variant, read_eval, read_manifest, write_manifest
from models.serving.runtime import OnnxClassifier, RuntimeOptions
from models.artifact.variants import choose_variant, int8_gate
from tests.tiny import solid_png, tiny_graph, write_tiny_model
from tests.tiny_conv import LABELS, noisy_colour_images, tiny_conv_graph, write_tiny_conv_model


# ---- quantizing a tiny model ---------------------------------------------------------------------


def test_normalisation_and_head_stay_float():
    from models.artifact.quantize import float_nodes

    kept = set(float_nodes(tiny_conv_graph().graph))
    # uint8 → float cast, (x - mean) / std and the stem conv; pooling, head and softmax after the last conv
    assert kept == {"transpose_0", "cast_1", "sub_2", "div_3", "conv_4", "reducemean_8", "gemm_9", "softmax_10"}


def multidepth_graph() -> onnx.ModelProto:
    """The tiny conv model with a multi-depth head, as training/multidepth.py exports one: the first
    stage's output pooled globally and over a slice, concatenated with the last stage's pool,
    standardised, then the head."""
    from onnx import helper, numpy_helper

    model = tiny_conv_graph()
    graph = model.graph
    head = next(n for n in graph.node if n.op_type == "Gemm")
    features = 8 * 3
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), "starts"), numpy_helper.from_array(np.array([8], np.int64), "ends"),
        numpy_helper.from_array(np.array([2], np.int64), "slice_axes"),
        numpy_helper.from_array(np.full(features, 0.5, np.float32), "feature_mean"),
        numpy_helper.from_array(np.full(features, 0.01, np.float32), "feature_scale"),
        numpy_helper.from_array(np.zeros((3, features), np.float32), "md.w"),
    ])
    extra = [
        helper.make_node("ReduceMean", ["r1", "axes"], ["pool1"], keepdims=0, name="stage1_pool"),
        helper.make_node("Slice", ["r1", "starts", "ends", "slice_axes"], ["top"], name="stage1_slice"),
        helper.make_node("ReduceMean", ["top", "axes"], ["pool1_top"], keepdims=0, name="stage1_cell"),
        helper.make_node("Concat", ["pool1", "pool1_top", "embedding"], ["features"], axis=1, name="concat"),
        helper.make_node("Sub", ["features", "feature_mean"], ["centred_features"], name="standardise_sub"),
        helper.make_node("Div", ["centred_features", "feature_scale"], ["standardised"], name="standardise_div"),
    ]
    head.input[0], head.input[1] = "standardised", "md.w"
    at = list(graph.node).index(head)
    for offset, node in enumerate(extra):
        graph.node.insert(at + offset, node)
    onnx.checker.check_model(model)
    return model


def test_the_first_stage_stays_float_up_to_the_first_downsampling_conv():
    from onnx import helper

    from models.artifact.quantize import float_nodes

    model = tiny_conv_graph()
    second = next(n for n in model.graph.node if n.name == "conv_6")
    second.attribute.append(helper.make_attribute("strides", [2, 2]))
    kept = set(float_nodes(model.graph))
    # the stem and its activation (the first stage) stay float; the strided conv starts the quantized part
    assert kept == {"transpose_0", "cast_1", "sub_2", "div_3", "conv_4", "relu_5", "reducemean_8", "gemm_9",
                    "softmax_10"}


def test_multidepth_pooling_standardisation_and_head_stay_float():
    from models.artifact.quantize import float_nodes

    kept = set(float_nodes(multidepth_graph().graph))
    assert {"stage1_pool", "stage1_slice", "stage1_cell", "concat", "standardise_sub", "standardise_div",
            "gemm_9", "softmax_10", "reducemean_8"} <= kept
    assert not kept & {"relu_5", "conv_6", "relu_7"}  # the backbone after the stem is quantized


def _signature(model: onnx.ModelProto) -> tuple[list, list]:
    return ([(i.name, i.type.tensor_type.elem_type) for i in model.graph.input],
            [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny conv model quantized once for the module: (version folder, test image folder)."""
    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples

    root = tmp_path_factory.mktemp("int8")
    directory = write_tiny_conv_model(root / "model")
    samples = noisy_colour_images(root / "data")
    data = data_from_samples(samples, read_manifest(directory), QuantizeConfig())
    quantize_version(directory, data)
    return directory, root / "data"


def test_quantized_graph_is_int8_qdq_with_the_same_interface(quantized):
    directory, _ = quantized
    fp32 = onnx.load(str(directory / "model.onnx"))
    int8 = onnx.load(str(directory / INT8_FILE))
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4 and ops.count("Conv") == 2
    weights = {i.name: i for i in int8.graph.initializer}
    conv_weights = [weights[n.input[0]] for n in int8.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in weights and len(weights[n.input[0]].dims) == 4]
    assert len(conv_weights) == 1 and conv_weights[0].data_type == onnx.TensorProto.INT8  # the second conv
    scales = [weights[n.input[1]] for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
              and len(weights[n.input[0]].dims) == 4]
    assert [s.dims for s in scales] == [[8]]  # one scale per output channel
    stem = next(n for n in int8.graph.node if n.op_type == "Conv")
    assert weights[stem.input[1]].data_type == onnx.TensorProto.FLOAT and stem.input[0] == "normalised"
    assert _signature(int8) == _signature(fp32)  # uint8 image in; logits, probabilities, embedding out
    head = next(n for n in int8.graph.node if n.op_type == "Gemm")
    assert all(not name.endswith(("_quantized", "_DequantizeLinear_Output")) for name in head.input[1:])


def test_variant_is_recorded_in_manifest_and_eval(quantized):
    directory, _ = quantized
    variant = read_manifest(directory).variants["int8"]
    assert variant.file == INT8_FILE and variant.calibration in ("minmax", "entropy", "percentile")
    assert variant.evaluated_on == "test" and variant.samples == 12 and variant.calibration_images == 24
    assert variant.agreement == 1.0 and variant.accuracy == 1.0 and variant.accuracy_delta == 0.0
    assert 0 <= variant.max_probability_diff < 0.1
    entry = read_eval(directory)["variants"]["int8"]
    assert entry["accuracy"] == 1.0 and entry["macro_f1"] == 1.0 and entry["fp32"]["accuracy"] == 1.0
    assert entry["agreement"] == 1.0 and entry["max_probability_diff"] == variant.max_probability_diff
    assert set(entry["validation"]) == {"minmax"}  # the first method already passed: no histograms built
    assert all(set(scores) >= {"accuracy", "agreement", "mean_probability_diff"} for scores in entry["validation"].values())
    assert read_eval(directory)["accuracy"] == 1.0  # the fp32 report is kept


def test_int8_graph_serves_real_answers(quantized):
    from models.serving.preprocess import prepare, stack

    directory, data = quantized
    model = OnnxClassifier(directory, "tiny", "v1", RuntimeOptions(device="cpu", precision="int8")).load()
    assert model.variant == "int8" and model.describe()["variant"] == "int8"
    images = sorted(data.glob("*/*.png"))
    probabilities = model.predict(stack([prepare(p, model.manifest.preprocessing) for p in images]))
    assert [LABELS[i] for i in probabilities.argmax(1)] == [p.parent.name for p in images]
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_quantizing_logs_one_line_per_method_and_prints_nothing(tmp_path, caplog, capsys):
    import logging

    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples

    directory = write_tiny_conv_model(tmp_path / "model")
    data = data_from_samples(noisy_colour_images(tmp_path / "data"), read_manifest(directory), QuantizeConfig())
    with caplog.at_level(logging.INFO):
        quantize_version(directory, data, QuantizeConfig(methods=("entropy", "percentile")))
    assert capsys.readouterr().out == ""  # ONNX Runtime's histogram progress prints went to a debug logger
    methods = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("int8 ")
               and r.name == "tuneserve.quantize" and "variant" not in r.getMessage()]
    assert methods == ["int8 entropy"]  # entropy passed, so percentile never ran
    loud = [r for r in caplog.records if "onnxruntime" in r.pathname and r.levelno >= logging.INFO]
    assert loud == []


def test_a_variant_that_cannot_pass_the_gate_is_skipped_with_the_reason(tmp_path, monkeypatch):
    import models.artifact.quantize as quantize
    from models.artifact.quantize_inputs import Int8Skipped, QuantizeConfig, data_from_samples

    directory = write_tiny_conv_model(tmp_path / "model")
    data = data_from_samples(noisy_colour_images(tmp_path / "data"), read_manifest(directory), QuantizeConfig())
    monkeypatch.setattr(quantize, "int8_gate", lambda variant: (False, "int8 test accuracy drop 3.00 points over the gate"))
    with pytest.raises(Int8Skipped, match="validation accuracy drop 3.00 points"):
        quantize.quantize_version(directory, data, QuantizeConfig(methods=("minmax", "percentile")))
    assert not (directory / INT8_FILE).exists() and read_manifest(directory).variants == {}
    entry = read_eval(directory)["variants"]["int8"]
    assert entry["skipped"].startswith(("minmax calibration", "percentile calibration"))
    assert set(entry["validation"]) == {"minmax", "percentile"}  # neither was good enough, both tried
    assert read_eval(directory)["accuracy"] == 1.0


# ---- choosing the variant -------------------------------------------------------------------------


def _manifest(int8_delta: float | None | str = "absent", agreement: float = 1.0):
    from models.artifact.manifest import Manifest, Preprocessing

    variants = {}
    if int8_delta != "absent":
        variants["int8"] = Variant(file=INT8_FILE, accuracy_delta=int8_delta, agreement=agreement,
                                   max_probability_diff=0.01)
    return Manifest(labels=["a", "b"], preprocessing=Preprocessing(size=8, resize=8, mean=(0,) * 3, std=(1,) * 3),
                    backbone="x", source="none", variants=variants)


PASSING, FAILING, NONE = -0.004, -0.02, "absent"
SELECTION = [
    # device, precision, int8 variant, served
    ("cpu", "auto", PASSING, "int8"),
    ("cpu", "auto", FAILING, "fp32"),
    ("cpu", "auto", NONE, "fp32"),
    ("cpu", "fp32", PASSING, "fp32"),
    ("cpu", "int8", FAILING, "int8"),  # asked for explicitly: served despite the gate
    ("cpu", "int8", NONE, "fp32"),
    ("cpu", "fp16", PASSING, "fp32"),  # no fast fp16 kernels on CPU
    ("gpu", "auto", PASSING, "fp16"),
    ("gpu", "auto", NONE, "fp16"),
    ("gpu", "fp32", PASSING, "fp32"),
    ("gpu", "int8", PASSING, "int8"),
    ("gpu", "int8", NONE, "fp32"),
    ("gpu", "fp16", FAILING, "fp16"),
]


@pytest.mark.parametrize("device, precision, int8, served", SELECTION)
def test_variant_choice_per_device_and_setting(device, precision, int8, served):
    choice = choose_variant(_manifest(int8), precision, on_gpu=device == "gpu")
    assert choice.variant == served and choice.reason
    assert choice.file == (INT8_FILE if served == "int8" else "model.onnx")
    assert choice.convert_fp16 == (served == "fp16")


def test_gate_without_labels_bounds_the_drop_by_disagreement():
    assert int8_gate(_manifest(None, agreement=0.996).variants["int8"])[0]
    passed, why = int8_gate(_manifest(None, agreement=0.99).variants["int8"])
    assert not passed and "1.00%" in why
    passed, why = int8_gate(_manifest(-0.006).variants["int8"])
    assert not passed and "0.60 points" in why and "over" in why


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, fp32, int8, fp16"):
        choose_variant(_manifest(), "int4", on_gpu=False)


def test_variant_file_must_sit_next_to_the_model():
    with pytest.raises(ValueError, match="plain .onnx file name"):
        Variant(file="../other/model.onnx", agreement=1.0, max_probability_diff=0.0)


def test_tensorrt_builds_the_served_precision():
    from models.serving.runtime import TENSORRT, ProviderPlan, tensorrt_precision
    from models.artifact.variants import VariantChoice

    plan = ProviderPlan(providers=[(TENSORRT, {"trt_fp16_enable": False}), ("CPUExecutionProvider", {})])
    tensorrt_precision(plan, VariantChoice("int8", INT8_FILE, "int8 requested"))
    assert plan.providers[0][1] == {"trt_fp16_enable": False, "trt_int8_enable": True}
    tensorrt_precision(plan, VariantChoice("fp16", "model.onnx", "auto on a GPU"))
    assert plan.providers[0][1] == {"trt_fp16_enable": True, "trt_int8_enable": False}


def test_old_fp16_switch_means_fp16_precision():
    assert RuntimeOptions(fp16=True).requested_precision == "fp16"
    assert RuntimeOptions(fp16=True, precision="int8").requested_precision == "int8"


# ---- serving the chosen variant ---------------------------------------------------------------------

BLUE_ALWAYS = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1]], np.float32)  # tells the int8 file apart


def write_gated_model(directory: Path, accuracy_delta: float) -> Path:
    """A tiny model whose 'int8' file answers blue for everything, with a recorded accuracy delta."""
    write_tiny_model(directory, accuracy=0.9)
    onnx.save(tiny_graph(3, BLUE_ALWAYS), str(directory / INT8_FILE))
    manifest = read_manifest(directory)
    variant = Variant(file=INT8_FILE, calibration="minmax", accuracy=0.9 + accuracy_delta,
                      accuracy_delta=accuracy_delta, agreement=0.97, max_probability_diff=0.2)
    write_manifest(manifest.model_copy(update={"variants": {"int8": variant}}), directory)
    return directory


def test_int8_failing_its_gate_is_served_fp32(tmp_path):
    fails = write_gated_model(tmp_path / "fails", accuracy_delta=-0.02)
    passes = write_gated_model(tmp_path / "passes", accuracy_delta=-0.003)
    cpu = RuntimeOptions(device="cpu")
    served = OnnxClassifier(fails, "fails", "v1", cpu).load()
    assert served.variant == "fp32" and "2.00 points over" in served.variant_reason
    assert OnnxClassifier(passes, "passes", "v1", cpu).load().variant == "int8"


def test_missing_variant_file_falls_back_to_fp32(tmp_path):
    directory = write_gated_model(tmp_path / "m", accuracy_delta=0.0)
    (directory / INT8_FILE).unlink()
    model = OnnxClassifier(directory, "m", "v1", RuntimeOptions(device="cpu", precision="int8")).load()
    assert model.variant == "fp32" and "missing" in model.variant_reason


def _serve(settings, requests):
    """Run `requests(client)` against the real FastAPI app with a real ModelPool, in process."""
    import httpx

    from service.app import create_app
    from service.pool import ModelPool

    async def go():
        app = create_app(settings)
        app.state.pool = pool = ModelPool(settings)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await requests(client)
        finally:
            await pool.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("precision, gated, served, label", [
    ("auto", "fails", "fp32", "red"),  # gate failed: the fp32 graph answers
    ("auto", "passes", "int8", "blue"),  # the int8 file (always blue here) answers
    ("fp32", "passes", "fp32", "red"),
])
def test_service_responses_name_the_variant(bento_home, tmp_path, precision, gated, served, label):
    from models.artifact import store
    from service.config import load_settings

    store.publish("fails", write_gated_model(tmp_path / "fails", accuracy_delta=-0.02))
    store.publish("passes", write_gated_model(tmp_path / "passes", accuracy_delta=-0.003))
    settings = load_settings({"BENTOML_HOME": str(bento_home), "TUNESERVE_DEVICE": "cpu", "TUNESERVE_AUTH": "off",
                              "TUNESERVE_PRECISION": precision, "TUNESERVE_DEFAULT_MODEL": gated})

    async def requests(client):
        one = await client.post("/classify", files={"image": ("r.png", solid_png("red"))})
        batch = await client.post("/classify_batch", files=[("images", ("r.png", solid_png("red")))])
        models = await client.get("/models")
        return one.json(), batch.json(), models.json()

    one, batch, models = _serve(settings, requests)
    assert one["variant"] == served and one["predictions"][0]["label"] == label
    assert batch["variant"] == served and batch["results"][0]["predictions"][0]["label"] == label
    loaded = next(iter(models["loaded"].values()))
    assert loaded["variant"] == served and loaded["variant_reason"]
    assert models["models"][gated]["versions"][0]["variants"] == ["fp32", "int8"]
    assert models["runtime"]["options"]["precision"] == precision


def test_settings_precision_is_checked():
    from service.config import SettingsError, load_settings

    assert load_settings({"TUNESERVE_PRECISION": "INT8"}).precision == "int8"
    with pytest.raises(SettingsError, match="TUNESERVE_PRECISION"):
        load_settings({"TUNESERVE_PRECISION": "int4"})


# ---- CLI and scoring ---------------------------------------------------------------------------------


def test_cli_quantizes_a_stored_version_in_place(bento_home, tmp_path, capsys):
    from models.artifact import store
    from tuneserve.cli import main

    data = tmp_path / "data"
    noisy_colour_images(data, per_class=8)
    version = store.publish("colours", write_tiny_conv_model(tmp_path / "stage"))
    assert main(["quantize", "colours", "--data", str(data), "--methods", "minmax"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == version.tag and printed["auto_serves_int8_on_cpu"] is True
    assert printed["int8"]["calibration"] == "minmax" and "within" in printed["gate"]
    stored = store.resolve("colours")
    assert stored.version == version.version  # the same version, now with a variant
    assert stored.manifest().variants["int8"].accuracy_delta == 0.0 and (stored.path / INT8_FILE).is_file()
    assert store.describe(stored)["variants"] == ["fp32", "int8"]


def test_cli_quantize_without_data_says_what_to_pass(bento_home, tmp_path, capsys):
    from models.artifact import store
    from tuneserve.cli import main

    store.publish("nodata", write_tiny_conv_model(tmp_path / "stage"))
    assert main(["quantize", "nodata"]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_score_precision_names_the_variant_in_every_row(bento_home, tmp_path):
    from models.artifact import store
    from tuneserve.score import score
    from tuneserve.score_output import read_rows

    store.publish("gated", write_gated_model(tmp_path / "stage", accuracy_delta=-0.02))
    images = tmp_path / "images"
    images.mkdir()
    (images / "r.png").write_bytes(solid_png("red"))
    for precision, variant, label in [("auto", "fp32", "red"), ("int8", "int8", "blue")]:
        output = tmp_path / f"{precision}.csv"
        score("gated", images, output, top_k=1, device="cpu", precision=precision, progress=False)
        rows = list(read_rows(output))
        assert [(r["variant"], r["label_1"]) for r in rows] == [(variant, label)]


def test_images_with_other_labels_are_split_by_seed_and_compared_unlabelled(tmp_path):
    from models.data.datasets import Sample
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples

    directory = write_tiny_conv_model(tmp_path / "model")
    samples = [Sample(s.path, "cat") for s in noisy_colour_images(tmp_path / "data", per_class=5)]  # not its labels
    data = data_from_samples(samples, read_manifest(directory), QuantizeConfig(calibration_images=6))
    assert len(data.calibration) == 6 and len(data.validation) == 3 and len(data.test) == 3
    assert len(data.spare) == 3 and len(data.fidelity_images()) == 6  # train images not calibrated on
    assert data.validation.labels is None and data.test.labels is None
    again = data_from_samples(samples, read_manifest(directory), QuantizeConfig(calibration_images=6))
    assert np.array_equal(again.test.arrays, data.test.arrays)  # the same split every time
