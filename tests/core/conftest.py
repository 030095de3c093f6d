from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tests.tiny import WORDS, make_tiny_model


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


def toy_examples(n: int = 48, seed: int = 0, task_type: str = "single_label_classification", pairs=False):
    """A learnable toy task: label 1 iff the sentence contains a positive word."""
    rng = random.Random(seed)
    pos, neg = ["good", "great", "fine", "fun", "love"], ["bad", "awful", "boring", "hate"]
    filler = [w for w in WORDS if w not in pos + neg]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = rng.sample(filler, rng.randint(2, 6)) + [rng.choice(pos if y else neg)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        if task_type == "regression":
            labels.append(float(y) + rng.random() * 0.1)
        elif task_type == "multi_label_classification":
            labels.append([float(y), float(1 - y), float(len(words) > 4)])
        else:
            labels.append(y)
    text_pairs = [" ".join(rng.sample(filler, 3)) for _ in texts] if pairs else None
    return SimpleNamespace(texts=texts, text_pairs=text_pairs, labels=labels)
