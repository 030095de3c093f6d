from __future__ import annotations

import pytest

from tests.tiny import make_tiny_model, toy_examples  # noqa: F401  (re-exported for the core tests)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> folder of a tiny random encoder with a tokenizer (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def get(arch: str = "bert") -> str:
        if arch not in cache:
            cache[arch] = str(make_tiny_model(root / arch, arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tiny_dirs) -> str:
    return tiny_dirs("bert")
