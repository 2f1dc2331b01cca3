"""API keys (service/auth.py, models/serving/api_keys.py): on by default with a generated key file, the
opt-out, named keys, revocation by editing the key file (no restart), and clients finding the key.

In process: the real FastAPI app from service/app.py; `POST /models/{name}/reload` is a mutating
route, and without a loaded model pool it answers 503, so 503 means "the key was accepted".
"""
from __future__ import annotations

import logging
import stat

import pytest
from fastapi.testclient import TestClient

from models.serving.api_keys import client_key, parse_keys
from service.app import create_app
from service.auth import AuthConfig, KeyRing
from service.config import SettingsError, key_settings, load_settings

RELOAD = "/models/imagenet/reload"
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


def _app(tmp_path, **env):
    settings = load_settings({"TUNESERVE_HOME": str(tmp_path / "home"), **env})
    return settings, TestClient(create_app(settings))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_first_start_creates_a_private_key_and_mutating_routes_need_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, "tuneserve.auth")
    settings, client = _app(tmp_path)
    path = settings.keys_file
    assert path == tmp_path / "home" / "api-keys" and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = parse_keys(path.read_text(), "test")["default"]
    assert len(key) >= 32
    assert str(path) in caplog.text and key not in caplog.text  # the log says where, never what

    refused = client.post(RELOAD)
    assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]
    assert refused.headers["www-authenticate"] == "Bearer"
    assert client.post(RELOAD, headers=_bearer("not-the-key")).status_code == 401
    assert client.post(RELOAD, headers=_bearer(key)).status_code == 503  # past auth; no model pool in this test
    assert client.get("/models").status_code != 401  # reading routes stay open

    KeyRing(AuthConfig.of(settings))  # what a restart or a second worker does: keeps the key
    assert parse_keys(path.read_text(), "test")["default"] == key


def test_opt_out_opens_every_route_and_warns_each_start(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tuneserve.auth")
    settings, client = _app(tmp_path, TUNESERVE_AUTH="off")
    assert "TUNESERVE_AUTH=off" in caplog.text
    assert client.post(RELOAD).status_code == 503
    assert not settings.keys_file.exists()  # no key is created when auth is off


def test_named_keys_and_revocation_without_restart(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nalice: {ALICE}\nbob: {BOB}\n")
    _, client = _app(tmp_path, TUNESERVE_API_KEYS_FILE=str(keys_file), TUNESERVE_API_KEYS="ci:ci-key-0123456789abcdef")
    for key in (ALICE, BOB, "ci-key-0123456789abcdef"):
        assert client.post(RELOAD, headers=_bearer(key)).status_code == 503

    keys_file.write_text(f"alice: {ALICE}\n")  # revoke bob: the server re-reads the changed file
    revoked = client.post(RELOAD, headers=_bearer(BOB))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]
    assert client.post(RELOAD, headers=_bearer(ALICE)).status_code == 503

    keys_file.write_text(f"alice {ALICE}\n")  # a broken edit revokes every file key (fail closed) ...
    assert client.post(RELOAD, headers=_bearer(ALICE)).status_code == 401
    assert client.post(RELOAD, headers=_bearer("ci-key-0123456789abcdef")).status_code == 503  # ... env keys stay
    keys_file.unlink()
    assert client.post(RELOAD, headers=_bearer(ALICE)).status_code == 401
    assert not keys_file.exists()  # never recreated while another key source exists


def test_protect_reads_guards_reading_routes(tmp_path):
    _, client = _app(tmp_path, TUNESERVE_API_KEY="single-key", TUNESERVE_PROTECT_READS="1")
    assert client.get("/models").status_code == 401
    assert client.get("/models", headers=_bearer("single-key")).status_code == 503
    assert not (tmp_path / "home" / "api-keys").exists()  # a configured key means no generated one


@pytest.mark.parametrize(
    "value, words",
    [("alice", "expected 'name: key'"), ("al ice:0123456789abcdef0", "key name"), ("alice:short", "at least 16"),
     (f"a:{ALICE},a:{BOB}", "appears twice")],
)
def test_bad_key_lists_are_refused_at_start(value, words):
    with pytest.raises(SettingsError, match=words):
        load_settings({"TUNESERVE_API_KEYS": value})


def test_clients_on_this_machine_find_the_key_file(tmp_path):
    settings, _ = _app(tmp_path)
    key = parse_keys(settings.keys_file.read_text(), "test")["default"]
    env = {"TUNESERVE_HOME": str(tmp_path / "home")}
    assert client_key("http://127.0.0.1:3000", key_settings(env)) == key
    assert client_key("localhost:3000", key_settings(env)) == key
    assert client_key("https://tuneserve.example.com", key_settings(env)) is None  # the local key never goes elsewhere
    assert client_key("https://tuneserve.example.com", key_settings({**env, "TUNESERVE_API_KEY": "given"})) == "given"
