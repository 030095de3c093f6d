"""Dataset imports (`POST /v1/datasets` with `{"hf": {...}}`): only a Hub dataset in server mode, never a file
the dataset card points at outside the dataset, bounded in rows and bytes while reading, run by the worker
(202 `importing`, then `ready` or `failed` with a reason). There is no Hub access here: the Hub path is the
same code as a local dataset folder (a README.md card with `configs` / `data_files`), which embedded mode
may import. Also: the API process never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from app.models import Blob, Dataset, utcnow
from app.services import datasets as service
from spafit_core import data as core_data
from spafit_core.errors import DataError, ImportTooLarge, UnsafeDataSource

from .helpers import SENTIMENT, assert_problem


# --------------------------------------------------------------------------------------------- helpers
def dataset_folder(root: Path, name: str = "ds", rows=SENTIMENT, data_files: object = "train.csv",
                   extra: str = "") -> Path:
    """A local dataset repo: train.csv and a README.md card whose default config reads `data_files`."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text("text,label\n" + "".join(f'"{t}",{lbl}\n' for t, lbl in rows))
    card = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}]}
    (folder / "README.md").write_text("---\n" + json.dumps(card) + "\n" + extra + "---\n# a dataset\n")
    return folder


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A server file no import may read: CSV-shaped, so a leak would show in label_counts."""
    path = tmp_path / "server-secret.csv"
    path.write_text("text,label\n" + "".join(f"row {i},SECRET-{i % 2}\n" for i in range(12)))
    return path


def many_rows(n: int) -> list[tuple[str, str]]:
    return [(f"text number {i}", "pos" if i % 2 else "neg") for i in range(n)]


# --------------------------------------------------------------------------------------- the core reader
def test_a_local_dataset_repo_loads_through_its_card(tmp_path):
    table = core_data.load_hf_dataset(str(dataset_folder(tmp_path)), "train")
    assert table.columns == ["text", "label"] and len(table) == len(SENTIMENT)


@pytest.mark.parametrize("data_files", [
    "ABSOLUTE", "../outside.csv", "sub/../../outside.csv", "~/x.csv", "https://example.com/x.csv",
    "hf://datasets/other/repo/train.csv", "file:///etc/passwd", "zip://x.csv::/tmp/a.zip", "C:/x.csv",
    ["train.csv", "ABSOLUTE"], 7,
])
def test_a_card_whose_data_files_point_outside_the_dataset_is_refused(tmp_path, secret, data_files):
    data_files = str(secret) if data_files == "ABSOLUTE" else data_files
    if isinstance(data_files, list):
        data_files = [str(secret) if f == "ABSOLUTE" else f for f in data_files]
    (tmp_path / "outside.csv").write_bytes(secret.read_bytes())
    folder = dataset_folder(tmp_path, data_files=data_files)
    with pytest.raises(UnsafeDataSource) as e:
        core_data.load_hf_dataset(str(folder), "train")
    assert e.value.field == "data_files" and e.value.status == 422
    with pytest.raises(UnsafeDataSource):  # the check that needs no network refuses it too
        core_data.check_source(str(folder), hub_only=False)


def test_a_card_data_dir_outside_the_dataset_is_refused(tmp_path, secret):
    folder = dataset_folder(tmp_path)
    card = {"configs": [{"config_name": "default", "data_dir": str(secret.parent)}]}
    (folder / "README.md").write_text("---\n" + json.dumps(card) + "\n---\n")
    with pytest.raises(UnsafeDataSource):
        core_data.load_hf_dataset(str(folder), "train")


def test_a_symlink_inside_the_dataset_to_a_server_file_is_refused(tmp_path, secret):
    folder = dataset_folder(tmp_path, data_files="link.csv")
    (folder / "link.csv").symlink_to(secret)
    with pytest.raises(UnsafeDataSource):
        core_data.load_hf_dataset(str(folder), "train")


def test_a_folder_without_a_card_whose_data_file_links_out_is_refused(tmp_path, secret):
    folder = tmp_path / "nocard"
    folder.mkdir()
    (folder / "train.csv").symlink_to(secret)
    with pytest.raises(UnsafeDataSource):
        core_data.load_hf_dataset(str(folder), "train")


def test_an_oversized_card_is_refused_before_it_is_parsed(tmp_path):
    folder = dataset_folder(tmp_path)
    (folder / "README.md").write_text("---\nconfigs: []\n---\n" + "x" * (core_data.MAX_CARD_CHARS + 1))
    with pytest.raises(DataError, match="longer than"):
        core_data.check_source(str(folder), hub_only=False)


@pytest.mark.parametrize("name", ["/etc/passwd", "./x", "../x", "a/b/c", "csv", "text", "x:y", "~"])
def test_hub_only_refuses_anything_but_a_hub_id(tmp_path, name):
    with pytest.raises(UnsafeDataSource):
        core_data.load_hf_dataset(name, "train", hub_only=True)


def test_hub_only_refuses_an_existing_local_folder_that_looks_like_a_hub_id(tmp_path, monkeypatch):
    dataset_folder(tmp_path, name="owner")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeDataSource):
        core_data.load_hf_dataset("owner", "train", hub_only=True)


def test_a_hub_import_never_uses_a_token_of_this_machine(monkeypatch, tmp_path):
    """A token the server holds (HF_TOKEN) must not open a private or gated dataset to a tenant."""
    seen: dict[str, object] = {}

    def card(repo_id, filename, **kw):
        seen["card"] = kw.get("token", "unset")
        path = tmp_path / "README.md"
        path.write_text("---\nconfigs: []\n---\n")
        return str(path)

    def builder(path, name=None, **kw):
        seen["builder"] = kw.get("token", "unset")
        raise FileNotFoundError("stop here")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", card)
    monkeypatch.setattr("datasets.load_dataset_builder", builder)
    with pytest.raises(DataError):
        core_data.load_hf_dataset("owner/private", "train", hub_only=True)
    assert seen == {"card": False, "builder": False}


def _counting_stream(n: int, seen: list[int]):
    from datasets import IterableDataset

    def rows():
        for i in range(n):
            seen.append(i)
            yield {"text": f"row {i} " + "x" * 50, "label": str(i % 2)}

    return IterableDataset.from_generator(rows)


def test_the_row_bound_stops_reading_as_soon_as_it_is_passed():
    seen: list[int] = []
    with pytest.raises(ImportTooLarge) as e:
        core_data._table_from_rows(_counting_stream(100_000, seen), None, 50, None)
    assert e.value.status == 413 and "50 rows" in e.value.message
    assert len(seen) <= 60  # stopped right after row 51, not after reading all 100 000


def test_the_byte_bound_stops_reading_as_soon_as_it_is_passed():
    seen: list[int] = []
    with pytest.raises(ImportTooLarge) as e:
        core_data._table_from_rows(_counting_stream(100_000, seen), None, None, 2_000)
    assert "2000 bytes" in e.value.message
    assert len(seen) <= 40  # about 80 bytes a row: ~25 rows read


def test_max_rows_keeps_the_first_rows_without_reading_on():
    seen: list[int] = []
    table = core_data._table_from_rows(_counting_stream(100_000, seen), 10, 50, 10_000)
    assert len(table) == 10 and len(seen) <= 12


# ------------------------------------------------------------------------------- the API (server mode)
@pytest.fixture
def trainer(tenant_key):
    return tenant_key("train")


@pytest.fixture
def held(app):
    """Import messages held back: the dataset stays `importing` (no worker involved)."""
    sent: list[uuid.UUID] = []
    app.state.send_import = sent.append
    return sent


def post_import(client, headers, name="owner/some-dataset", **body):
    return client.post("/v1/datasets", json={"hf": {"name": name}, **body}, headers=headers)


def test_an_import_is_202_importing_and_is_sent_to_the_worker(client, trainer, held):
    r = post_import(client, trainer.headers, max_rows=100, text_fields=["text"], label_field="label")
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["state"], body["error"], body["rows"], body["sha256"], body["source"]) == \
        ("importing", None, None, None, "hf")
    assert r.headers["location"] == f"/v1/datasets/{body['id']}"
    assert held == [uuid.UUID(body["id"])]
    got = client.get(f"/v1/datasets/{body['id']}", headers=trainer.headers).json()
    assert got["state"] == "importing" and got["source_detail"]["max_rows"] == 100


def test_another_tenant_cannot_see_an_import(client, trainer, tenant_key, held):
    dataset = post_import(client, trainer.headers).json()
    assert_problem(client.get(f"/v1/datasets/{dataset['id']}", headers=tenant_key("train").headers), 404)


@pytest.mark.parametrize("state", ["importing", "failed"])
def test_a_job_on_a_dataset_that_is_not_ready_is_422(client, trainer, held, db, state):
    dataset = post_import(client, trainer.headers).json()
    if state == "failed":
        with db.transaction() as s:
            s.execute(update(Dataset).where(Dataset.id == uuid.UUID(dataset["id"]))
                      .values(state="failed", error_type="import-too-large", error_message="too many rows"))
    r = client.post("/v1/jobs", json={"task": "t", "train_dataset": dataset["id"]}, headers=trainer.headers)
    body = assert_problem(r, 422, "dataset-not-ready")
    assert body["field"] == "train_dataset" and state in body["detail"]


def test_imports_in_progress_are_limited_per_tenant(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(make_settings(max_concurrent_imports=2))
    app.state.send_import = lambda dataset_id: None
    a, b = tenant_key("train"), tenant_key("train")
    with TestClient(app) as client:
        assert [post_import(client, a.headers).status_code for _ in range(2)] == [202, 202]
        r = post_import(client, a.headers)
        assert_problem(r, 429, "too-many-imports")
        assert r.headers["retry-after"]
        assert post_import(client, b.headers).status_code == 202  # another tenant is not held back


def test_max_rows_above_the_service_limit_is_422(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(max_import_rows=100))) as client:
        body = assert_problem(post_import(client, tenant_key("train").headers, max_rows=101), 422, "invalid-dataset")
    assert body["field"] == "max_rows"


def test_unknown_import_members_are_422(client, trainer):
    r = client.post("/v1/datasets", json={"hf": {"name": "a/b", "data_files": "/etc/passwd"}}, headers=trainer.headers)
    assert "body.hf.data_files" in [e["field"] for e in assert_problem(r, 422, "validation-error")["errors"]]


def test_a_broker_that_cannot_take_the_import_is_503_and_nothing_stays_importing(client, trainer, db):
    def down(dataset_id):
        raise ConnectionError("broker down")

    client.app.state.send_import = down
    assert_problem(post_import(client, trainer.headers), 503, "service-unavailable")
    with db.session() as s:
        states = s.scalars(select(Dataset.state).where(Dataset.tenant_id == trainer.tenant_id)).all()
    assert states == ["failed"]


# ------------------------------------------------------------------- the worker's function, in-process
@pytest.fixture
def local_settings(make_settings):
    """Embedded mode, auth off (local paths allowed), on the session's Postgres."""
    return lambda **kw: make_settings(mode="embedded", auth_enabled=False, **kw)


def start(db, tenant_id, settings, source: str, **body) -> uuid.UUID:
    from app.schemas import HfDatasetCreate

    with db.session() as s:
        return service.start_import(s, tenant_id, HfDatasetCreate.model_validate({"hf": {"name": source}, **body}),
                                    settings).id


def row(db, dataset_id) -> Dataset:
    with db.session() as s:
        ds = s.get(Dataset, dataset_id)
        s.expunge(ds)
        return ds


def test_run_import_makes_a_local_repo_ready_like_an_upload(db, trainer, local_settings, tmp_path):
    settings = local_settings()
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path)), name="sst")
    assert service.run_import(db, dataset_id, settings) == "ready"
    ds = row(db, dataset_id)
    assert (ds.state, ds.name, ds.rows, ds.format, ds.label_counts) == ("ready", "sst", 12, "jsonl",
                                                                       {"neg": 6, "pos": 6})
    with db.session() as s:
        assert s.get(Blob, ds.sha256).size == ds.size_bytes
    assert service.run_import(db, dataset_id, settings) == "final"  # a re-delivered message changes nothing


def test_run_import_refuses_a_card_that_changed_to_point_outside(db, trainer, local_settings, tmp_path, secret):
    settings = local_settings()
    folder = dataset_folder(tmp_path)
    dataset_id = start(db, trainer.tenant_id, settings, str(folder))
    dataset_folder(tmp_path, data_files=str(secret))  # after the request's check, before the worker reads
    assert service.run_import(db, dataset_id, settings) == "failed"
    ds = row(db, dataset_id)
    assert (ds.state, ds.error_type, ds.sha256, ds.label_counts) == ("failed", "unsafe-data-source", None, None)
    assert "SECRET" not in json.dumps(ds.report) + ds.error_message  # nothing of the file was read
    assert "absolute path" in ds.error_message and "data_files" in ds.error_message


def test_the_request_refuses_a_local_card_pointing_outside_with_422(make_settings, secret, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    folder = dataset_folder(tmp_path, data_files=str(secret))
    with TestClient(create_app(make_settings(mode="embedded", auth_enabled=False)), base_url="http://localhost") as client:
        client.app.state.send_import = lambda dataset_id: pytest.fail("a refused import was sent")
        body = assert_problem(client.post("/v1/datasets", json={"hf": {"name": str(folder)}}), 422,
                              "unsafe-data-source")
    assert body["field"] == "data_files" and "SECRET" not in json.dumps(body)


@pytest.mark.parametrize("overrides", [{"auth_enabled": True}, {"insecure_bind": True}])
def test_embedded_mode_on_the_network_or_with_keys_imports_hub_datasets_only(make_settings, tmp_path, overrides):
    from app.services.datasets import local_paths_allowed

    settings = make_settings(mode="embedded", **{"auth_enabled": False, **overrides})
    assert not local_paths_allowed(settings)
    with pytest.raises(UnsafeDataSource):
        core_data.check_source(str(dataset_folder(tmp_path)), hub_only=not local_paths_allowed(settings))
    assert local_paths_allowed(make_settings(mode="embedded", auth_enabled=False))


@pytest.mark.parametrize("limits, message", [({"max_import_rows": 20}, "more than 20 rows"),
                                             ({"max_import_bytes": 500}, "larger than 500 bytes")])
def test_run_import_over_a_bound_fails_and_stores_nothing(db, trainer, local_settings, tmp_path, limits, message):
    settings = local_settings(**limits)
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path, rows=many_rows(200))))
    assert service.run_import(db, dataset_id, settings) == "failed"
    ds = row(db, dataset_id)
    assert (ds.state, ds.error_type, ds.sha256) == ("failed", "import-too-large", None)
    assert message in ds.error_message and "max_rows" in ds.error_message


def test_max_rows_imports_the_first_rows_under_the_bound(db, trainer, local_settings, tmp_path):
    settings = local_settings(max_import_rows=20)
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path, rows=many_rows(200))),
                       max_rows=15)
    assert service.run_import(db, dataset_id, settings) == "ready"
    assert row(db, dataset_id).rows == 15


def test_run_import_of_nul_characters_fails_in_words(db, trainer, local_settings, tmp_path):
    from datasets import Dataset as HFDataset

    settings = local_settings()
    HFDataset.from_dict({"text": ["ok", "bad\x00text"] * 6, "label": ["a", "b"] * 6}).save_to_disk(str(tmp_path / "nul"))
    dataset_id = start(db, trainer.tenant_id, settings, str(tmp_path / "nul"))
    assert service.run_import(db, dataset_id, settings) == "failed"
    assert (row(db, dataset_id).error_type, "NUL" in row(db, dataset_id).error_message) == ("invalid-dataset", True)


def test_run_import_of_invalid_data_fails_with_the_report(db, trainer, local_settings, tmp_path):
    settings = local_settings()
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path)), label_field="nope")
    assert service.run_import(db, dataset_id, settings) == "failed"
    ds = row(db, dataset_id)
    assert ds.error_type == "invalid-dataset" and "nope" in ds.error_message and ds.report["ok"] is False


def test_an_import_deleted_while_importing_stores_nothing(db, trainer, local_settings, tmp_path):
    settings = local_settings()
    folder = dataset_folder(tmp_path, rows=[*SENTIMENT, (f"only here {uuid.uuid4()}", "pos")])
    dataset_id = start(db, trainer.tenant_id, settings, str(folder))
    with db.session() as s:
        service.delete(s, trainer.tenant_id, dataset_id)
    blobs_before = _count(db, Blob)
    assert service.run_import(db, dataset_id, settings) == "final"
    assert _count(db, Blob) == blobs_before


def _count(db, model) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_an_import_that_keeps_killing_its_worker_gives_up(db, trainer, local_settings, tmp_path):
    settings = local_settings()
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path)))
    with db.transaction() as s:
        s.execute(update(Dataset).where(Dataset.id == dataset_id).values(import_attempts=service.MAX_IMPORT_ATTEMPTS))
    assert service.run_import(db, dataset_id, settings) == "gave_up"
    assert row(db, dataset_id).error_type == "worker-lost"


def test_lost_imports_are_failed_or_sent_again(db, trainer, local_settings, tmp_path):
    """A taken import whose worker went silent fails; one no worker took (its message lost) is sent again,
    once per import_timeout_s; a recent one is left alone."""
    settings = local_settings(import_timeout_s=60, max_concurrent_imports=5)
    taken, waiting, recent = (start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path, n)))
                              for n in ("a", "b", "c"))
    long_ago = utcnow() - timedelta(seconds=600)
    with db.transaction() as s:
        s.execute(update(Dataset).where(Dataset.id == taken).values(import_attempts=1, updated_at=long_ago))
        s.execute(update(Dataset).where(Dataset.id == waiting).values(updated_at=long_ago))
    sent: list[uuid.UUID] = []
    failed, resent = service.requeue_imports(db, sent.append, settings)
    assert failed >= 1 and waiting in sent and recent not in sent and taken not in sent
    assert (row(db, taken).state, row(db, taken).error_type) == ("failed", "worker-lost")
    assert row(db, waiting).state == "importing"
    sent.clear()
    service.requeue_imports(db, sent.append, settings)
    assert waiting not in sent  # touched when sent: not again before another import_timeout_s
    assert service.run_import(db, waiting, settings) == "ready"  # the re-sent message does the import


def test_the_worker_time_limit_fails_the_import_as_a_timeout(db, trainer, local_settings, tmp_path, monkeypatch):
    class SoftTimeLimitExceeded(Exception):  # what Celery raises inside a task past its soft time limit
        pass

    def slow(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    settings = local_settings(import_timeout_s=5)
    dataset_id = start(db, trainer.tenant_id, settings, str(dataset_folder(tmp_path)))
    monkeypatch.setattr("datasets.load_dataset_builder", slow)
    assert service.run_import(db, dataset_id, settings) == "failed"
    ds = row(db, dataset_id)
    assert (ds.error_type, ds.error_message) == ("import-timeout", "the import took longer than 5 s")


def test_a_hub_import_in_server_mode_refuses_a_path_even_in_the_worker(db, trainer, make_settings, secret):
    settings = make_settings()
    with db.transaction() as s:  # as if the row had been written some other way
        ds = Dataset(tenant_id=trainer.tenant_id, name="x", format="jsonl", columns=[], text_fields=[], report={},
                     source="hf", source_detail={"name": str(secret), "split": "train"}, state="importing")
        s.add(ds)
        s.flush()
        dataset_id = ds.id
    assert service.run_import(db, dataset_id, settings) == "failed"
    assert row(db, dataset_id).error_type == "unsafe-data-source"


# ----------------------------------------------------------------- through real workers, both modes
def test_a_hub_import_through_the_live_worker_ends_failed_with_its_reason(live_server, make_key):
    """Server mode (Postgres, Redis, a Celery worker process): no Hub here, so the import fails, in words."""
    from spafit_client import Client, DatasetImportFailed

    with Client(live_server.url, api_key=make_key("train").key) as client:
        started = client.datasets.import_hf("spafit-tests/no-such-dataset", wait=False)
        assert started.state == "importing"
        with pytest.raises(DatasetImportFailed) as e:
            client.datasets.wait(started, timeout=120)
        assert e.value.error_type == "invalid-dataset" and "Hub" in e.value.message
        assert client.datasets.get(started.id).state == "failed"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`spafit serve` in embedded mode as quickstart runs it: SQLite, the SQLite broker, its own worker."""
    import os

    from tests.live import ChildProcess, free_port, subprocess_env

    root = tmp_path_factory.mktemp("embedded-imports")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    env = subprocess_env(env, SPAFIT_DATA_DIR=str(root / "data"), SPAFIT_PRELOAD_BASE_MODEL="false",
                         SPAFIT_MAX_IMPORT_ROWS="100", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    port = free_port()
    proc = ChildProcess(["serve", "--host", "127.0.0.1", "--port", str(port)], env, root / "serve.log").launch()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        import httpx

        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        proc.wait_for(ready, 90)
        yield url, root
    finally:
        proc.stop()


def test_embedded_import_runs_in_the_worker_and_becomes_ready(embedded):
    from spafit_client import Client

    url, root = embedded
    folder = dataset_folder(root, "sst")
    with Client(url) as client:
        ds = client.datasets.import_hf(str(folder), dataset_name="sst", timeout=120)
        assert (ds.state, ds.rows, ds.label_counts) == ("ready", 12, {"neg": 6, "pos": 6})
        job = client.jobs.create(task="sst", train_dataset=ds, hyperparameters={"epochs": 1})
        client.jobs.cancel(job)  # accepted: a ready import trains like an upload


def test_embedded_import_over_the_row_bound_fails_in_words(embedded):
    from spafit_client import Client, DatasetImportFailed

    url, root = embedded
    with Client(url) as client, pytest.raises(DatasetImportFailed) as e:
        client.datasets.import_hf(str(dataset_folder(root, "big", rows=many_rows(150))), timeout=120)
    assert e.value.error_type == "import-too-large" and "100 rows" in e.value.message


def test_cli_datasets_import_waits_for_ready(embedded):
    from click.testing import CliRunner

    from app.cli import main

    url, root = embedded
    folder = dataset_folder(root, "cli")
    out = CliRunner().invoke(main, ["datasets", "import", str(folder), "--url", url, "--max-rows", "5", "--json"])
    assert out.exit_code == 0, out.output
    body = json.loads(out.stdout)
    assert (body["state"], body["rows"]) == ("ready", 5)
    shown = CliRunner().invoke(main, ["datasets", "show", body["id"], "--url", url])
    assert shown.exit_code == 0 and "[ready]" in shown.stdout and "rows: 5" in shown.stdout
    nowait = CliRunner().invoke(main, ["datasets", "import", str(folder), "--url", url, "--no-wait", "--json"])
    assert nowait.exit_code == 0 and json.loads(nowait.stdout)["state"] in ("importing", "ready")
    bad = CliRunner().invoke(main, ["datasets", "import", str(dataset_folder(root, "bad", rows=many_rows(150))),
                                    "--url", url, "--json"])
    assert bad.exit_code != 0 and "import-too-large" in bad.stderr


# ------------------------------------------------------------------------------ no torch in the API
def test_importing_the_app_does_not_import_torch():
    code = "import sys, app.main, app.routes.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_app_modules_never_import_torch_themselves():
    root = Path(__file__).resolve().parents[2] / "app"
    offenders = [str(p) for p in root.rglob("*.py")
                 if any(line.startswith(("import torch", "from torch")) for line in p.read_text().splitlines())]
    assert offenders == []


def test_data_error_is_the_parent_of_the_import_errors():
    assert issubclass(UnsafeDataSource, DataError) and issubclass(ImportTooLarge, DataError)
