"""Adapters for the serving tests: tiny random BERT backbones, adapters with random non-zero tensors on them,
registration through the registry (as a worker does it) and apps that serve them."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.tiny import make_tiny_model

TEXTS = ["good movie", "the plot was very boring and bad", "ok", "i love this film it is great fun",
         "awful actor", "not bad but not great either"]
SPAFIT = dict(name="spafit", n1=1, n2=2, rank=2)
LORA = dict(name="lora", rank=2)
BITFIT = dict(name="bitfit")


def tiny_backbone(root: Path, seed: int = 0) -> str:
    """A tiny random BERT folder; another seed gives another base model (other weights, same shapes)."""
    return str(make_tiny_model(root / f"bert-{seed}", "bert", seed=seed))


def random_adapter(base_model: str, method: dict | None = None, labels: tuple[str, ...] = ("neg", "pos"),
                   seed: int = 0, task_type: str = "single_label_classification") -> tuple[dict, bytes]:
    """(config, weights) of an adapter whose every trainable tensor is random and non-zero."""
    import torch

    from spafit_core import MethodConfig, TaskSpec
    from spafit_core.adapter import serialize
    from spafit_core.model import SpafitModel
    from spafit_core.train import set_seed

    set_seed(seed)
    model = SpafitModel.from_pretrained(base_model, MethodConfig(**(method or SPAFIT)),
                                        TaskSpec(task_type=task_type, labels=labels))
    with torch.no_grad():
        for t in model.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * 0.3)
    return serialize(model, max_seq_length=32, metrics={"accuracy": 0.5 + seed / 100})


def register(db: Any, tenant_id: Any, task: str, cfg: dict, weights: bytes, *, activate: bool = True) -> Any:
    """Register a version the way the worker does, and commit; returns the version row."""
    from app.services import registry

    with db.session() as session:
        version = registry.register_version(session, tenant_id, task, cfg, weights, activate=activate)
        session.commit()
        return version


def pack(cfg: dict, weights: bytes) -> bytes:
    from spafit_core.adapter import pack as core_pack

    return core_pack(cfg, weights)


def zip_of(files: dict[str, bytes]) -> bytes:
    """A zip holding exactly `files` (for archives `pack` would never make)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def config_bytes(cfg: dict) -> bytes:
    return json.dumps(cfg).encode()


def serving_settings(make_settings: Any, base_model: str, **overrides: Any) -> Any:
    values = dict(default_base_model=base_model, engine_device="cpu", preload_base_model=True)
    return make_settings(**{**values, **overrides})


@contextmanager
def settings_factory(pg_url: str, redis_url: str, redis_prefix: str, data_dir: Path) -> Iterator[Any]:
    """`make_settings` for module-scoped apps (conftest's fixture is per test)."""
    import pytest

    from app.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SPAFIT_") and not name.startswith("SPAFIT_TEST_"):
                mp.delenv(name)

        def make(**overrides: Any) -> Settings:
            values: dict[str, Any] = dict(mode="server", database_url=pg_url, broker_url=redis_url,
                                          broker_key_prefix=redis_prefix, data_dir=data_dir, readiness_timeout=3.0,
                                          preload_base_model=False)
            return Settings(_env_file=None, **{**values, **overrides})

        yield make


def wait_ready(client: Any, timeout: float = 60.0) -> dict:
    """Poll /readyz until it is 200 (the backbone loads in the background); returns its body."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.05)


@contextmanager
def serve(settings: Any) -> Iterator[Any]:
    """A running app (lifespan included) with its backbone loaded: a TestClient with `.app` and `.serving`."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        if settings.preload_base_model:
            body = wait_ready(client)
            assert body.get("status") == "ready", body
        client.serving = client.app.state.serving
        yield client


@contextmanager
def served_on(base: str, pg_url: str, redis_url: str, redis_prefix: str, tmp_path_factory: Any,
              **overrides: Any) -> Iterator[Any]:
    """`serve` of an app on backbone `base` (CPU), with a data folder of its own: a module's `api` fixture."""
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("data")) as make, \
            serve(make(default_base_model=base, engine_device="cpu", **overrides)) as client:
        yield client


@contextmanager
def fast_and_stack(pg_url: str, redis_url: str, redis_prefix: str, tmp_path_factory: Any, base: str) -> Iterator[Any]:
    """(fast, stack): two apps on one database and backbone with small limits, the predict fast path
    (app/fast_path.py) on in the first only: whatever either answers, the other must answer the same."""
    common = dict(default_base_model=base, engine_device="cpu", preload_base_model=True, max_predict_inputs=4,
                  max_input_chars=200, max_request_bytes=4096, max_upload_bytes=4096, allowed_hosts=["testserver"])
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("fast")) as make_fast, \
            settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("stack")) as make_stack, \
            serve(make_fast(predict_fast_path=True, **common)) as fast, \
            serve(make_stack(predict_fast_path=False, **common)) as stack:
        yield fast, stack


def direct(client: Any, version_id: Any, inputs: list, top_k: int | None = None) -> list[dict]:
    """What the app's own engine answers for a version, called directly (no HTTP, no batcher)."""
    return client.serving.engine.predict(str(version_id), inputs, top_k)


def assert_same_predictions(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"], (g, w)
        assert abs(g["score"] - w["score"]) <= tol, (g, w)
        assert [s["label"] for s in g["scores"]] == [s["label"] for s in w["scores"]]
        assert all(abs(a["score"] - b["score"]) <= tol for a, b in zip(g["scores"], w["scores"], strict=True))
