"""Sample files and assertions shared by the API tests."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

PROBLEM_TYPE_BASE = "https://spafit.dev/problems/"
SENTIMENT = [("a great film", "pos"), ("boring and slow", "neg"), ("I loved it", "pos"), ("awful acting", "neg"),
             ("fun plot", "pos"), ("not good", "neg"), ("very fine", "pos"), ("hate it", "neg"),
             ("superb", "pos"), ("dull", "neg"), ("a classic", "pos"), ("a mess", "neg")]


def csv_bytes(rows=SENTIMENT, header=("text", "label")) -> bytes:
    return ("\n".join([",".join(header), *(f'"{t}",{label}' for t, label in rows)]) + "\n").encode()


def unique_csv() -> bytes:
    """A valid CSV no other test uploads (blobs are shared by content, across tenants)."""
    return csv_bytes([*SENTIMENT, (f"unique {secrets.token_hex(8)}", "pos")])


def tsv_bytes(rows=SENTIMENT, header=("sentence", "label")) -> bytes:
    return ("\n".join(["\t".join(header), *(f"{t}\t{label}" for t, label in rows)]) + "\n").encode()


def jsonl_bytes(rows=SENTIMENT) -> bytes:
    return "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(client: Any, content: bytes, filename: str = "train.csv", headers: dict | None = None, **fields: Any):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=fields, headers=headers or {})


def assert_problem(response: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with the given status (and type slug); returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    for member in ("type", "title", "status", "detail"):
        assert member in body, body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if slug is not None:
        assert body["type"] == PROBLEM_TYPE_BASE + slug, body
    return body


def csv_of(size: int, tag: str = "") -> bytes:
    """A valid two-class CSV of exactly `size` bytes (its last row's text pads it)."""
    body, i = "text,label\n", 0
    while len(body) < size - 60:
        body += f"row {tag}{i} text,{'pos' if i % 2 else 'neg'}\n"
        i += 1
    body += "x" * (size - len(body) - len(",neg\n")) + ",neg\n"
    assert len(body.encode()) == size
    return body.encode()


def stored_usage(client: Any, key: Any) -> dict[str, Any]:
    """GET /v1/usage as `key`'s tenant (200 asserted)."""
    r = client.get("/v1/usage", headers=key.headers)
    assert r.status_code == 200, r.text
    return r.json()


def queued_batch_prediction(client: Any, key: Any, db: Any, base: str, tag: str = "") -> tuple[str, int, Any]:
    """For `key`'s tenant: a 1,500-byte dataset, a version of task `served` on `base` (registered as a job would)
    and a batch prediction of it, queued (nothing runs it). Returns (dataset id, the adapter's bytes, job id)."""
    import uuid

    from .adapters import SPAFIT, random_adapter, register

    ds = upload(client, csv_of(1500, tag), headers=key.headers).json()["id"]
    cfg, weights = random_adapter(base, SPAFIT)
    register(db, key.tenant_id, "served", cfg, weights)
    r = client.post("/v1/batch-predictions", json={"task": "served", "dataset": ds}, headers=key.headers)
    assert r.status_code == 202, r.text
    return ds, len(weights), uuid.UUID(r.json()["id"])


def race_reservations(db: Any, tenant_id: Any, limit: int, row_for: Any, writers: int = 8,
                      join_s: float = 60.0) -> tuple[list[int], list[int], list[str]]:
    """`writers` threads released together, each reserving 1,000 bytes of the tenant's storage quota `limit`
    (`quota.reserve`) and storing `row_for(i)` (a row charged 1,000 bytes) in the same transaction, as concurrent
    API replicas or workers do. Returns (stored, refused, errors): thread indexes, and any other exception's repr
    (a "database is locked" is one)."""
    import threading

    from app.errors import StorageQuotaExceeded
    from app.services import quota

    barrier, stored, refused, errors = threading.Barrier(writers), [], [], []

    def store(i: int) -> None:
        try:
            with db.session() as s:
                barrier.wait()
                try:
                    quota.reserve(s, limit, tenant_id, 1000, "a test row")
                except StorageQuotaExceeded:
                    refused.append(i)
                    return
                s.add(row_for(i))
                s.commit()
                stored.append(i)
        except Exception as e:  # noqa: BLE001  (reported to the test, which fails on it)
            errors.append(repr(e))

    threads = [threading.Thread(target=store, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    return stored, refused, errors


def dataset_row(tenant_id: Any, i: int, size: int = 1000) -> Any:
    """A Dataset row charged `size` bytes (no content: for quota arithmetic)."""
    from app.models import Dataset

    return Dataset(tenant_id=tenant_id, name=f"d{i}", format="csv", columns=[], text_fields=[], report={}, rows=1,
                   size_bytes=size)
