"""The `tuneserve` command line, end to end: help, demo data, models, evaluate, train, serve."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models.artifact import store
from tests.tiny import solid_png, write_tiny_model
from tuneserve.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_command_explains_itself(capsys):
    commands = _subcommands()
    assert {"train", "evaluate", "models", "bootstrap", "demo-data", "serve", "build", "score", "finetune"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: tuneserve {command}") and len(out.splitlines()) > 3


def test_demo_data_writes_class_folders(tmp_path):
    assert main(["demo-data", "digits", str(tmp_path / "digits"), "--size", "16"]) == 0
    digits = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert digits == [str(i) for i in range(10)]
    assert sum(1 for _ in (tmp_path / "digits").rglob("*.png")) == 1797  # scikit-learn's load_digits
    assert main(["demo-data", "textures", str(tmp_path / "tex"), "--size", "16", "--per-class", "3"]) == 0
    classes = [p for p in (tmp_path / "tex").iterdir() if p.is_dir()]
    assert len(classes) >= 3 and all(len(list(c.glob("*.png"))) == 3 for c in classes)


def _colour_folders(root: Path) -> Path:
    for label in ("red", "green", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{i}.png").write_bytes(solid_png(label, (24 + i, 20)))
    return root


def test_models_and_evaluate_commands(bento_home, tmp_path, capsys):
    version = store.publish("colours", write_tiny_model(tmp_path / "m", accuracy=0.9))
    assert main(["models"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["colours"][0]["version"] == version.version and listing["colours"][0]["eval"]["accuracy"] == 0.9
    assert main(["models", "show", f"colours:{version.version}"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["labels"] == ["red", "green", "blue"]
    assert main(["models", "show", "nope"]) == 2  # a clear error, not a traceback
    assert "unknown model 'nope'" in capsys.readouterr().err

    data = _colour_folders(tmp_path / "data")
    report_file = tmp_path / "report.json"
    assert main(["evaluate", "--model", "colours", "--data", str(data), "--output", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["accuracy"] == 1.0 and report["samples"] == 6
    assert json.loads(capsys.readouterr().out) == report  # printed too
    assert main(["evaluate", "--model", "colours", "--data", str(data), "--compare-with", f"colours:{version.version}"]) == 0
    assert json.loads(capsys.readouterr().out)["difference"]["accuracy"] == 0.0


@pytest.mark.slow
def test_train_command_publishes_a_version(bento_home, tmp_path, capsys):
    data = tmp_path / "data"
    for label, colour in (("dark", (20, 20, 20)), ("light", (230, 230, 230))):
        (data / label).mkdir(parents=True)
        for i in range(8):
            (data / label / f"{i}.png").write_bytes(solid_png(tuple(c + i for c in colour), (20, 20)))
    code = main([
        "train", "--name", "cli-tiny", "--source", "simple_cnn", "--weights", "none", "--data", str(data),
        "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--output-dir", str(tmp_path / "run"),
    ])
    assert code == 0
    version = store.resolve("cli-tiny")
    assert version.manifest().labels == ["dark", "light"] and version.manifest().source == "simple_cnn:none"
    assert (tmp_path / "run" / "config.json").is_file()
    assert json.loads(capsys.readouterr().out)["model"] == version.tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_serves_the_store(tmp_path):
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "TUNESERVE_WORKERS": "1", "BENTOML_DO_NOT_TRACK": "true"}
    publish = "from models.artifact import store; from tests.tiny import write_tiny_model; from pathlib import Path; " \
              f"store.publish('colours', write_tiny_model(Path({str(tmp_path / 'm')!r})))"
    subprocess.run([sys.executable, "-c", publish], env=env, cwd=ROOT, check=True, timeout=120)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneserve", "serve", "--host", "127.0.0.1", "--port", str(port), "--default-model", "colours"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "tuneserve serve exited"
            time.sleep(0.3)
        response = httpx.post(f"http://127.0.0.1:{port}/classify", files={"image": ("b.png", solid_png("blue"))})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "blue"
        assert response.json()["model"] == "colours"
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


@pytest.mark.slow
def test_build_makes_a_bento_that_carries_the_model(tmp_path):
    """`tuneserve build` runs `bentoml build` offline; the exported bento holds the model version."""
    import tarfile

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    publish = "from models.artifact import store; from tests.tiny import write_tiny_model; from pathlib import Path; " \
              f"print(store.publish('colours', write_tiny_model(Path({str(tmp_path / 'm')!r}))).tag)"
    tag = subprocess.run([sys.executable, "-c", publish], env=env, cwd=ROOT, check=True, timeout=120,
                         capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "tuneserve", "build", tag], env=env, cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    archive = tmp_path / "tuneserve.bento"
    subprocess.run([sys.executable, "-m", "bentoml", "export", "tuneserve:latest", str(archive)], env=env, cwd=ROOT,
                   check=True, timeout=120, capture_output=True)
    with tarfile.open(archive) as bento:
        names = bento.getnames()
    version = tag.split(":")[1]
    assert f"./models/colours/{version}/model.onnx" in names and f"./models/colours/{version}/manifest.json" in names
    assert "./src/service/service.py" in names and "./src/training/run.py" in names
    assert not any("/.venv/" in n or "/tests/" in n for n in names)
