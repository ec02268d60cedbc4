import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT / "scripts"))  # shared helpers (engine_runs.free_port), scripts run by tests
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".vllm-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pairs")


@pytest.fixture(scope="session")
def pair(fixtures_root):
    from vllm_gemma_mtp.fixtures import ensure_pair

    cache = {}

    def get(flavor: str) -> Path:
        if flavor not in cache:
            cache[flavor] = ensure_pair(flavor, root=fixtures_root)
        return cache[flavor]

    return get


@pytest.fixture(scope="session")
def engine_runs():
    """(target, assistant, k, env-items, extra-items) -> EngineResult, each configuration started once."""
    from engine_utils import run_engine

    cache = {}

    def get(target, assistant=None, k=3, env=None, **kw):
        key = (str(target), str(assistant), k, tuple(sorted((env or {}).items())), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = run_engine(str(target), None if assistant is None else str(assistant), k,
                                    env=env, **kw)
        return cache[key]

    return get
