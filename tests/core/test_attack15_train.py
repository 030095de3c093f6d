"""Training attacks (issue 15): a run train() refuses before its first step leaves the model as it found it."""

from __future__ import annotations

import pytest

from spafit_core.errors import ConfigError
from spafit_core.train import train
from tests.core import test_train as neighbour

cfg, data, make = neighbour.cfg, neighbour.data, neighbour.make
one_epoch_checkpoint = neighbour.one_epoch_checkpoint  # a fixture


def test_a_refused_resume_with_the_prefix_cache_on_leaves_the_prefix_training(tiny_bert, one_epoch_checkpoint):
    """The checkpoint is refused (other n2) after the cache was planned: the model's prefix flag must not stay
    set, else a later model.train() would silently keep the embeddings and frozen layers without dropout."""
    m = make(tiny_bert, n1=1, n2=3)
    with pytest.raises(ConfigError, match="not resumed"):
        train(m, data(m), cfg(epochs=2, prefix_cache=True), checkpoint_path=one_epoch_checkpoint)
    assert not m.prefix_eval
    m.train()
    assert all(mod.training for p in m.prefix_modules() for mod in p.modules())
