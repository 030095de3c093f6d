"""PEFT import attacks through the API (issue 15): a damaged zip is a 422 naming the damage, not a 500; a
folder whose config and weights disagree is refused, not served with outputs PEFT would not give."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from . import test_peft_import as peft_import
from .adapters import zip_of
from .helpers import assert_problem

LABELS, ZIP = peft_import.LABELS, peft_import.ZIP
base, api, peft_folder = peft_import.base, peft_import.api, peft_import.peft_folder  # its fixtures

pytest.importorskip("peft")


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_damaged_peft_zip_is_422_not_500(api, tenant_key, peft_folder):
    key = tenant_key("train", "predict")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files_of(peft_folder[0]).items():
            z.writestr(name, data)
    raw = bytearray(buf.getvalue())
    at = raw.find(b"adapter_model.safetensors") + len("adapter_model.safetensors") + 10  # inside its data
    raw[at] ^= 0xFF
    r = api.put("/v1/tasks/damaged/adapter", params={"labels": LABELS}, content=bytes(raw),
                headers={**key.headers, **ZIP})
    assert "damaged" in assert_problem(r, 422, "invalid-adapter")["detail"]
    assert_problem(api.get("/v1/tasks/damaged", headers=key.headers), 404)


def test_a_config_that_does_not_select_the_weights_is_422(api, tenant_key, peft_folder):
    key = tenant_key("train", "predict")
    files = files_of(peft_folder[0])
    files["adapter_config.json"] = json.dumps({**json.loads(files["adapter_config.json"]),
                                               "target_modules": ["dense"]}).encode()
    r = api.put("/v1/tasks/inconsistent/adapter", params={"labels": LABELS}, content=zip_of(files),
                headers={**key.headers, **ZIP})
    assert_problem(r, 422, "invalid-adapter")
    assert r.json()["field"] == "target_modules"


@pytest.mark.parametrize("scale", [1e30, 1e36])
def test_finite_but_overflowing_peft_factors_are_422_not_null_scores(api, tenant_key, peft_folder, scale):
    """LoRA factors x1e30 are finite, pass the NaN check, and were served with every score null."""
    from safetensors.torch import load, save

    key = tenant_key("train", "predict")
    files = files_of(peft_folder[0])
    tensors = load(files["adapter_model.safetensors"])
    files["adapter_model.safetensors"] = save({k: v * scale if "lora_B" in k else v for k, v in tensors.items()})
    r = api.put("/v1/tasks/overflowing/adapter", params={"labels": LABELS}, content=zip_of(files),
                headers={**key.headers, **ZIP})
    assert "beyond" in assert_problem(r, 422, "invalid-adapter")["detail"]
    assert_problem(api.get("/v1/tasks/overflowing", headers=key.headers), 404)
