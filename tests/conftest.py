import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def bento_home(tmp_path, monkeypatch):
    """A private BentoML store per test: nothing touches the user's ~/bentoml."""
    home = tmp_path / "bentoml"
    home.mkdir()
    monkeypatch.setenv("BENTOML_HOME", str(home))
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store.reset()
    yield home
    BentoMLContainer.model_store.reset()
