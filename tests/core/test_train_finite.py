"""Only finite results: a non-finite loss stops training with the step in words; an adapter holding NaN or
infinite tensors is refused by `check_finite` (and so never registered: see the registry test below)."""

from __future__ import annotations

import pytest
import torch

from spafit_core import TaskSpec
from spafit_core.errors import NonFiniteError
from spafit_core.train import check_finite, train
from tests.core.test_train import cfg, data, make


def test_a_nan_loss_stops_training_naming_the_step(tiny_bert, tmp_path):
    m = make(tiny_bert, task=TaskSpec(task_type="regression", labels=()), n1=0, n2=2)
    d = data(m, 48)
    # One NaN label, in the third batch of the first epoch (the epoch's order is a function of seed + epoch).
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3)).tolist()
    d.labels[order[17]] = float("nan")
    events = []
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(NonFiniteError) as e:
        train(m, d, cfg(epochs=2, batch_size=8), callback=events.append, checkpoint_path=ckpt)
    assert "became nan at step 3 of 12 (epoch 1)" in e.value.message and e.value.type == "non-finite"
    assert e.value.detail == {"step": 3, "epoch": 1}
    assert [ev["step"] for ev in events if ev["type"] == "progress"] == [1, 2]  # steps 1 and 2 were fine


def test_an_infinite_loss_stops_training_too(tiny_bert):
    m = make(tiny_bert, task=TaskSpec(task_type="regression", labels=()), n1=0, n2=2)
    d = data(m, 16)
    d.labels[:] = 1e38  # finite in float32; its square is not
    with pytest.raises(NonFiniteError, match="became inf at step 1 of"):
        train(m, d, cfg(epochs=1))


def test_check_finite_names_the_bad_tensors_and_passes_good_ones(tiny_bert):
    from safetensors.torch import save

    m = make(tiny_bert)
    tensors = {k: v.detach().clone() for k, v in m.adapter_state_dict().items()}
    check_finite(tensors)
    check_finite(save(tensors))  # safetensors bytes, as the worker and the registry hold them
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"1 tensor\(s\)") as e:
        check_finite(save(tensors))
    assert e.value.detail["tensors"] == [name]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    with pytest.raises(NonFiniteError):
        check_finite(tensors)
