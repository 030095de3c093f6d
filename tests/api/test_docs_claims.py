"""Claims of the README that a docs audit found the code breaking, each checked where a user would meet it.

- *Batch prediction*: "The download carries `Content-Length` and answers one byte range" -- in embedded mode
  (`spafit serve` with no settings: SQLite) too. The result's size was summed with `octet_length()`, which the
  SQLite that Python 3.11 ships (3.40) does not have (SQLite has it from 3.43): every download of a succeeded
  batch prediction was a 503 `database-unavailable` there (and `spafit batch create --wait -o` failed).
- `spafit tasks export TASK --out PATH`: "A .zip path or a folder". Click's `Path(path_type=Path)` dropped the
  trailing slash of `--out new-folder/`, so the zip was written to a *file* named `new-folder`.
"""

from __future__ import annotations

import json
import uuid
import zipfile
from typing import Any

from tests.api.adapters import random_adapter, register, tiny_backbone
from tests.api.helpers import csv_bytes, upload
from tests.live import uvicorn_in_thread

# Two stored chunks with multi-byte characters: Content-Length is the bytes, not the characters.
CHUNKS = [
    (json.dumps({"id": 0, "label": "positif \u00e9t\u00e9", "score": 0.9}, ensure_ascii=False) + "\n").encode(),
    (json.dumps({"id": 1, "label": "\u00fcbel \u2603", "score": 0.8}, ensure_ascii=False) + "\n").encode(),
]
BODY = b"".join(CHUNKS)


def _succeeded_batch_prediction(database: Any, tenant_id: uuid.UUID, dataset_id: str) -> uuid.UUID:
    """A batch prediction job as a worker leaves it: succeeded, its result stored as chunks."""
    from app.models import BatchChunk, Job

    with database.session() as s:
        job = Job(tenant_id=tenant_id, kind="predict", task_name="sentiment", base_model="base",
                  train_dataset_id=uuid.UUID(dataset_id), text_fields=["text"], method={}, status="succeeded",
                  hyperparameters={"format": "jsonl"})
        s.add(job)
        s.flush()
        for i, data in enumerate(CHUNKS):
            s.add(BatchChunk(job_id=job.id, chunk=i, rows=1, data=data))
        s.commit()
        return job.id


def _check_download(client: Any, job_id: uuid.UUID, headers: dict[str, str]) -> None:
    whole = client.get(f"/v1/batch-predictions/{job_id}/results", headers=headers)
    assert whole.status_code == 200, whole.text
    assert whole.content == BODY and whole.headers["content-length"] == str(len(BODY))
    start = len(CHUNKS[0]) + 3  # inside the second chunk: the first is skipped by its stored size
    part = client.get(f"/v1/batch-predictions/{job_id}/results", headers={**headers, "Range": f"bytes={start}-"})
    assert part.status_code == 206, part.text
    assert part.content == BODY[start:]
    assert part.headers["content-range"] == f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"
    past = client.get(f"/v1/batch-predictions/{job_id}/results", headers={**headers, "Range": f"bytes={len(BODY)}-"})
    assert past.status_code == 416, past.text


def test_batch_results_download_on_the_embedded_sqlite_database(make_settings, tmp_path):
    """`spafit serve` on its embedded defaults: the results download answers (it was a 503 on SQLite < 3.43)."""
    from fastapi.testclient import TestClient

    from app.db import Database
    from app.main import create_app
    from app.services import keys, migrate

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    settings = make_settings(mode="embedded", auth_enabled=False, database_url=url,
                             broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", broker_key_prefix="")
    database = Database.from_url(url)
    try:
        with database.session() as s:
            tenant_id = keys.ensure_local_tenant(s).id
        with TestClient(create_app(settings), base_url="http://localhost") as client:
            dataset = upload(client, csv_bytes())
            assert dataset.status_code == 201, dataset.text
            job_id = _succeeded_batch_prediction(database, tenant_id, dataset.json()["id"])
            _check_download(client, job_id, {})
    finally:
        database.dispose()


def test_batch_results_download_on_postgres(client, tenant_key, db):
    """The same download in server mode (Postgres `bytea`): `length()` counts its bytes as well."""
    key = tenant_key("train")
    dataset = upload(client, csv_bytes(), headers=key.headers)
    assert dataset.status_code == 201, dataset.text
    job_id = _succeeded_batch_prediction(db, key.tenant_id, dataset.json()["id"])
    _check_download(client, job_id, key.headers)


def test_cli_tasks_export_out_a_new_folder_writes_the_zip_inside_it(make_settings, tenant_key, db, tmp_path):
    """`spafit tasks export TASK --out new-folder/` puts `<task>-v<N>.zip` in that folder (it made a file)."""
    from click.testing import CliRunner

    from app.cli import main
    from app.main import create_app

    base = tiny_backbone(tmp_path)
    key = tenant_key("train")
    register(db, key.tenant_id, "docs-export", *random_adapter(base))
    with uvicorn_in_thread(create_app(make_settings(default_base_model=base))) as url:
        out = tmp_path / "new-folder"
        r = CliRunner().invoke(main, ["tasks", "export", "docs-export", "--out", f"{out}/", "--json"],
                               env={"SPAFIT_URL": url, "SPAFIT_API_KEY": key.key})
        assert r.exit_code == 0, r.output
        assert out.is_dir(), "the zip was written to a file named like the folder"
        assert json.loads(r.stdout)["path"] == str(out / "docs-export-v1.zip")
        assert zipfile.is_zipfile(out / "docs-export-v1.zip")
        again = CliRunner().invoke(main, ["tasks", "export", "docs-export", "--out", str(tmp_path / "a.zip")],
                                   env={"SPAFIT_URL": url, "SPAFIT_API_KEY": key.key})
        assert again.exit_code == 0 and zipfile.is_zipfile(tmp_path / "a.zip"), again.output
