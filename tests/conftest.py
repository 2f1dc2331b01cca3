import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

def _point_bentoml_at(home):
    """Override BentoML's cached store singletons (`reset()` alone keeps their cache)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    providers = ("bentoml_home", "model_store_dir", "model_store")
    if home is None:
        for name in providers:
            getattr(BentoMLContainer, name).reset()
        return
    (home / "models").mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store_dir.set(str(home / "models"))
    BentoMLContainer.model_store.set(ModelStore(str(home / "models")))


@pytest.fixture
def bento_home(tmp_path, monkeypatch):
    """A private BentoML store per test: nothing touches the user's ~/bentoml."""
    home = tmp_path / "bentoml"
    home.mkdir()
    monkeypatch.setenv("BENTOML_HOME", str(home))
    _point_bentoml_at(home)
    yield home
    _point_bentoml_at(None)
