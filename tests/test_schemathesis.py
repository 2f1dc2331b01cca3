"""The declared API (/api/openapi.json) fuzzed by schemathesis against the real server, with
every check and the stateful phase (following the OpenAPI links: a submitted job → its status, log,
cancel, resume, delete), authenticated with a valid key: no 5xx, only documented statuses and media
types, responses that match their schemas, schema-invalid requests refused, schema-valid requests
accepted, authentication enforced where declared required, 405 with Allow for undeclared methods.
Zero failures allowed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune_support import make_dataset
from tests.serving import ROOT, bento_store, running_server
from tests.tiny import write_trusted_tiny_model

pytestmark = pytest.mark.slow
pytest.importorskip("schemathesis")

KEY = "fuzz-key"
CONFIG = """
# Every check schemathesis has, with its defaults, except what is said below.
[checks]
# Stricter than the default (which also counts a 5xx as a refusal): a schema-invalid request gets a
# 4xx. 413 added: how the server refuses what is over a limit (the body, an image's pixels, files).
negative_data_rejection = { expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"] }

# Rules no JSON Schema can state, so a schema-valid request may still be refused, naming the rule:
# - a fine-tune config's cross-field rules (val_fraction + test_fraction < 0.9, a patch-size multiple
#   for image_size, weights not given twice, ...) and a `source` / advise `candidates` that names a
#   stored model this server does not hold (server state, not schema): 422;
# - a /v2 tensor the served model cannot take (its shape, element count or bytes): 400.
# Schemathesis' positive check assumes every schema-valid request is acceptable; for these it is not.
[[operations]]
include-name = "POST /finetune"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-name = "POST /advise"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# /v2 on the served model, so requests reach the tensor parsing.
[[operations]]
include-path-regex = "^/v2/models/"
parameters = { "path.name" = "imagenet" }

[[operations]]
include-path-regex = "^/v2/models/.*/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# The production loop: server state, not the schema, decides some refusals: an unknown request_id or
# capture (404); a rollout of the stable version, nothing to promote or roll back, no labelled
# feedback to fine-tune from (409).
[[operations]]
include-path-regex = "^/(feedback|models/.*/(rollout|promote|rollback|finetune_from_feedback|capture|review))"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# A multipart form cannot carry a type: a one-element list and a file whose content is "123" are
# valid on the wire, and schemathesis misjudges cases that combine two such mutations (an integer
# image and a one-element `model` list) as negative; /classify_batch's refusals are covered in test_service.py.
[[operations]]
include-name = "POST /classify_batch"
checks.negative_data_rejection.enabled = false
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
# `explain_label` must be one of the served version's labels (server state, not schema): 422.
[[operations]]
include-name = "POST /classify"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    with bento_store(base / "bento"):
        from models.artifact import store

        make_dataset(base / "data" / "colours", classes=("red", "green", "blue"))
        # with thresholds and an in-domain score, so every schema-valid min_confidence (also `auto`) applies
        store.publish("imagenet", write_trusted_tiny_model(base / "v1", base / "samples"))
        env = {
            "TUNESERVE_API_KEY": KEY,
            "TUNESERVE_HOME": str(base / "home"),
            "TUNESERVE_DATA_ROOT": str(base / "data"),
            "TUNESERVE_WORKERS": "1",
            "TUNESERVE_MAX_BODY_MB": "2",
            "TUNESERVE_MAX_BATCH": "4",
            "TUNESERVE_MAX_TOP_K": "10",
            # accepted jobs fail at once: no torch, and nothing is published into the store under test
            "TUNESERVE_TRAINING_COMMAND": "false",
        }
        with running_server(env, base / "server.log") as url:
            yield url, base


def test_schemathesis_finds_nothing(fuzz_server):
    url, base = fuzz_server
    config = base / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/api/openapi.json",
        "--url", url, "-H", f"Authorization: Bearer {KEY}",
        "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "50", "--seed", "20261129",
        "--workers", "1", "--no-shrink", "--request-timeout", "30", "--output-truncate", "false",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True, timeout=1500)
    report = run.stdout[-20000:] + run.stderr[-3000:]
    Path(os.environ.get("SCHEMATHESIS_OUT", base / "schemathesis.out")).write_text(run.stdout + run.stderr)
    assert run.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 500, report  # every case passed, and there were many
