"""PEFT through the API, against PEFT itself: PUT /v1/tasks/{task}/adapter takes a zipped PEFT LoRA folder and
serves it with PEFT's outputs; GET /v1/tasks/{task}/adapter?format=peft gives a folder PEFT loads with ours."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import pytest

from .adapters import SPAFIT, TEXTS, random_adapter, register, served_on, tiny_backbone, zip_of
from .helpers import assert_problem

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
ZIP = {"Content-Type": "application/zip"}
LABELS = ["neg", "pos", "meh"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def api(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    with served_on(base, pg_url, redis_url, redis_prefix, tmp_path_factory, preload_base_model=True) as client:
        yield client


def stock(base):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    """A LoRA adapter trained a few steps with PEFT itself on the stock classifier, saved by PEFT."""
    from transformers import AutoTokenizer

    from tests.tiny import toy_examples

    torch.manual_seed(0)
    pm = peft.get_peft_model(stock(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                          target_modules=["query", "value"],
                                                          layers_to_transform=[2, 3], layers_pattern="layer"))
    tok = AutoTokenizer.from_pretrained(base)
    ex = toy_examples(16)
    enc = tok(ex.texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(5):
        pm(**enc, labels=torch.tensor(ex.labels)).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    pm.save_pretrained(folder)
    pm.eval()
    with torch.no_grad():
        logits = pm(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    return folder, logits


def zipped(folder, prefix=""):
    return zip_of({prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def scores(client, task, headers):
    r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS}, headers=headers)
    assert r.status_code == 200, r.text
    return torch.tensor([[s["score"] for s in sorted(p["scores"], key=lambda s: LABELS.index(s["label"]))]
                         for p in r.json()["predictions"]])


def test_a_peft_trained_adapter_imports_and_serves_peft_outputs(api, tenant_key, peft_folder):
    key = tenant_key("train", "predict")
    folder, want = peft_folder
    assert (folder / "README.md").exists()  # PEFT's own files ride along and are ignored
    r = api.put("/v1/tasks/from-peft/adapter", params={"labels": LABELS}, content=zipped(folder, "adapter/"),
                headers={**key.headers, **ZIP})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["labels"] == LABELS and v["method"]["rank"] == 4 and v["stratification"]["n2"] == 2
    assert (scores(api, "from-peft", key.headers) - want.softmax(-1)).abs().max() < 1e-5
    from spafit_core.engine import Row  # the served logits themselves, from the app's engine

    engine = api.serving.engine
    adapter = engine.adapter(str(v["id"]))
    served = torch.stack(engine.forward([Row(adapter, f) for f in engine.encode(adapter, TEXTS)]))
    assert (served - want).abs().max() < 1e-5


def test_peft_import_refuses_a_base_model_the_service_does_not_serve(api, tenant_key, peft_folder):
    key = tenant_key("train", "predict")
    folder, _ = peft_folder
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    cfg = json.loads(files["adapter_config.json"])
    cfg["base_model_name_or_path"] = "someone/else-model"
    files["adapter_config.json"] = json.dumps(cfg).encode()
    r = api.put("/v1/tasks/elsewhere/adapter", content=zip_of(files), headers={**key.headers, **ZIP})
    assert "does not serve" in assert_problem(r, 422, "adapter-mismatch")["detail"]
    assert_problem(api.get("/v1/tasks/elsewhere", headers=key.headers), 404)


@pytest.mark.parametrize("mutate, words", [
    (lambda f: f.update({"adapter_model.bin": f.pop("adapter_model.safetensors")}), "pickled"),
    (lambda f: f.update({"adapter_config.json": b'{"peft_type": "IA3"}'}), "only PEFT LoRA"),
    (lambda f: f.update({"adapter_model.safetensors": b"garbage"}), "safetensors"),
])
def test_a_bad_peft_archive_is_422_saying_what_is_wrong(api, tenant_key, peft_folder, mutate, words):
    key = tenant_key("train", "predict")
    files = {p.name: p.read_bytes() for p in peft_folder[0].iterdir() if p.is_file()}
    mutate(files)
    r = api.put("/v1/tasks/bad-peft/adapter", content=zip_of(files), headers={**key.headers, **ZIP})
    assert words in assert_problem(r, 422, "invalid-adapter")["detail"]


def test_labels_that_do_not_fit_the_peft_head_are_refused(api, tenant_key, peft_folder):
    key = tenant_key("train", "predict")
    r = api.put("/v1/tasks/bad-labels/adapter", params={"labels": ["a", "b"]}, content=zipped(peft_folder[0]),
                headers={**key.headers, **ZIP})
    assert_problem(r, 422, "adapter-mismatch")


def test_download_as_peft_loads_in_peft_with_our_outputs(api, tenant_key, db, base, tmp_path):
    from spafit_core.adapter import load_weights, model_from_adapter

    key = tenant_key("train", "predict")
    cfg, weights = random_adapter(base, SPAFIT, labels=tuple(LABELS), seed=3)
    register(db, key.tenant_id, "ours", cfg, weights)
    r = api.get("/v1/tasks/ours/adapter", params={"format": "peft"}, headers=key.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].endswith('-v1-peft.zip"')
    plain = api.get("/v1/tasks/ours/adapter", headers=key.headers)
    assert plain.headers["etag"] != r.headers["etag"]
    again = api.get("/v1/tasks/ours/adapter", params={"format": "peft"},
                    headers={**key.headers, "If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors", "spafit_export.json"]
        z.extractall(tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(stock(base), tmp_path / "peft").eval()
    ours = model_from_adapter(cfg, load_weights(cfg, weights))
    b = dict(ours.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert (pm(**b).logits - ours(b)).abs().max() < 1e-5
    # another tenant sees no such task, in any format
    other = tenant_key("train", "predict")
    assert_problem(api.get("/v1/tasks/ours/adapter", params={"format": "peft"}, headers=other.headers), 404)


def test_an_adapter_without_lora_has_no_peft_form_and_says_so(api, tenant_key, db, base):
    from .adapters import BITFIT

    key = tenant_key("train", "predict")
    register(db, key.tenant_id, "biases", *random_adapter(base, BITFIT, seed=4))
    r = api.get("/v1/tasks/biases/adapter", params={"format": "peft"}, headers=key.headers)
    assert "no LoRA" in assert_problem(r, 422, "invalid-adapter")["detail"]
    assert assert_problem(api.get("/v1/tasks/biases/adapter", params={"format": "onnx"}, headers=key.headers), 422)


def test_an_archive_in_the_old_layout_still_imports(api, tenant_key, base):
    """Downloads made before the config was renamed (adapter_config.json + adapter.safetensors) import as
    they are; new downloads carry spafit_adapter.json."""
    key = tenant_key("train", "predict")
    cfg, weights = random_adapter(base, SPAFIT, seed=5)
    old = zip_of({"adapter_config.json": json.dumps(cfg).encode(), "adapter.safetensors": weights})
    r = api.put("/v1/tasks/old-layout/adapter", content=old, headers={**key.headers, **ZIP})
    assert r.status_code == 201, r.text
    new = api.get("/v1/tasks/old-layout/adapter", headers=key.headers)
    with zipfile.ZipFile(io.BytesIO(new.content)) as z:
        assert sorted(z.namelist()) == ["adapter.safetensors", "spafit_adapter.json"]


def test_peft_conversions_are_one_per_tenant_and_an_export_is_converted_once(api, tenant_key, db, base, monkeypatch,
                                                                           peft_folder):
    """Each conversion loads the base model in the API process: a tenant's second one while its first runs is a
    429 (Retry-After) and not a second model in memory, another tenant's runs meanwhile, and the same version
    downloaded again is served from the cache without converting."""
    from concurrent.futures import ThreadPoolExecutor

    from app.services import registry

    key, other = tenant_key("train", "predict"), tenant_key("train", "predict")
    for k, seed in ((key, 5), (key, 6), (other, 7)):
        register(db, k.tenant_id, f"conv{seed}", *random_adapter(base, SPAFIT, labels=tuple(LABELS), seed=seed))
    real, entered, release, converted = registry.peft_archive, threading.Event(), threading.Event(), []

    def held(archive: bytes) -> bytes:  # the first conversion waits until told, so that it is running for certain
        converted.append(archive)
        if len(converted) == 1:
            entered.set()
            assert release.wait(30)
        return real(archive)

    monkeypatch.setattr(registry, "peft_archive", held)
    peft_zip = {"format": "peft"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(api.get, "/v1/tasks/conv5/adapter", params=peft_zip, headers=key.headers)
        try:
            assert entered.wait(30)
            busy = api.get("/v1/tasks/conv6/adapter", params=peft_zip, headers=key.headers)
            assert assert_problem(busy, 429, "too-many-conversions") and busy.headers["Retry-After"] == "1"
            imported = api.put("/v1/tasks/imp/adapter", content=zipped(peft_folder[0]),
                               params={"labels": LABELS}, headers={**key.headers, **ZIP})  # an import loads it too
            assert_problem(imported, 429, "too-many-conversions")
            theirs = api.get("/v1/tasks/conv7/adapter", params=peft_zip, headers=other.headers)
            assert theirs.status_code == 200, theirs.text
        finally:
            release.set()
        assert first.result(timeout=60).status_code == 200
    mine = api.get("/v1/tasks/conv6/adapter", params=peft_zip, headers=key.headers)  # its turn now
    assert mine.status_code == 200 and len(converted) == 3
    again = api.get("/v1/tasks/conv5/adapter", params=peft_zip, headers=key.headers)
    assert again.status_code == 200 and again.content == first.result().content and len(converted) == 3
    imported = api.put("/v1/tasks/imp/adapter", content=zipped(peft_folder[0]), params={"labels": LABELS},
                       headers={**key.headers, **ZIP})
    assert imported.status_code == 201, imported.text
