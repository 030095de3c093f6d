"""POST/GET/DELETE /v1/datasets against the real Postgres registry."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from app.models import Blob, Dataset, Job
from app.services import blobs

from .helpers import SENTIMENT, assert_problem, csv_bytes, jsonl_bytes, sha256, tsv_bytes, unique_csv, upload


@pytest.fixture
def trainer(tenant_key):
    return tenant_key("train")


@pytest.mark.parametrize("filename, content, columns, text_field", [
    ("train.csv", csv_bytes(), ["text", "label"], "text"),
    ("train.tsv", tsv_bytes(), ["sentence", "label"], "sentence"),
    ("train.jsonl", jsonl_bytes(), ["text", "label"], "text"),
])
def test_upload_returns_201_with_rows_columns_and_sha256(client, trainer, filename, content, columns, text_field):
    r = upload(client, content, filename, trainer.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == filename.rsplit(".", 1)[1]
    assert body["rows"] == len(SENTIMENT)
    assert body["columns"] == columns
    assert body["sha256"] == sha256(content)
    assert body["size_bytes"] == len(content)
    assert body["text_fields"] == [text_field] and body["label_field"] == "label"
    assert body["label_counts"] == {"neg": 6, "pos": 6}
    assert body["report"]["ok"] is True
    assert body["name"] == filename and body["source"] == "upload"
    uuid.UUID(body["id"])


def test_upload_format_is_sniffed_without_an_extension(client, trainer):
    r = upload(client, jsonl_bytes(), "data", trainer.headers)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "jsonl"


def test_upload_with_explicit_fields_and_name(client, trainer):
    content = csv_bytes(header=("review", "stars"))
    r = upload(client, content, "x.csv", trainer.headers, name="reviews", text_fields="review", label_field="stars")
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["text_fields"], r.json()["label_field"]) == ("reviews", ["review"], "stars")


def test_stored_bytes_are_the_upload_and_shared_by_identical_uploads(client, trainer, db):
    content = csv_bytes(SENTIMENT[::-1])
    first = upload(client, content, "a.csv", trainer.headers).json()
    second = upload(client, content, "b.csv", trainer.headers).json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    with db.session() as session:
        assert blobs.get(session, first["sha256"]) == content
        assert session.scalar(select(Blob.size).where(Blob.sha256 == first["sha256"])) == len(content)


def test_malformed_csv_is_422_naming_the_line(client, trainer):
    content = b'text,label\n"fine",pos\n"unclosed quote,neg\nok,pos\n'
    body = assert_problem(upload(client, content, "bad.csv", trainer.headers), 422, "invalid-dataset")
    assert "line 3" in body["detail"]


def test_wrong_field_count_is_422_naming_the_line(client, trainer):
    body = assert_problem(upload(client, b"text,label\nok,pos\ntoo,many,fields\n", "bad.csv", trainer.headers),
                          422, "invalid-dataset")
    assert "line 3" in body["detail"]


def test_missing_label_column_is_422_naming_the_columns(client, trainer):
    content = csv_bytes(header=("text", "sentiment"))
    body = assert_problem(upload(client, content, "x.csv", trainer.headers, label_field="label"), 422,
                          "invalid-dataset")
    assert body["field"] == "label"
    assert "'label'" in body["detail"] and "text, sentiment" in body["detail"]
    assert body["errors"][0]["code"] == "missing_column"


def test_content_problems_are_422_listing_each_line(client, trainer):
    content = b"text,label\nfine,pos\n,neg\ngood,\n" + b"".join(f"t{i},pos\n".encode() for i in range(10))
    body = assert_problem(upload(client, content, "x.csv", trainer.headers), 422, "invalid-dataset")
    found = {(e["code"], e["line"]) for e in body["errors"]}
    assert ("empty_text", 3) in found and ("missing_label", 4) in found
    assert all(e["severity"] == "error" for e in body["errors"])
    assert body["report"]["ok"] is False


def test_rejected_upload_leaves_nothing_behind(client, trainer, db):
    content = b"text,label\n,neg\n"
    assert upload(client, content, "x.csv", trainer.headers).status_code == 422
    assert client.get("/v1/datasets", headers=trainer.headers).json()["items"] == []
    with db.session() as session:
        assert not blobs.contains(session, sha256(content))


def test_upload_over_max_upload_bytes_is_413(make_settings, trainer):
    from fastapi.testclient import TestClient

    from app.main import create_app

    # the body fits max_request_bytes, so this exercises the streamed cap on the file itself
    app = create_app(make_settings(max_upload_bytes=1000, max_request_bytes=100_000))
    with TestClient(app) as client:
        content = csv_bytes(SENTIMENT * 20)
        assert len(content) > 1000
        body = assert_problem(upload(client, content, "big.csv", trainer.headers), 413, "payload-too-large")
        assert body["field"] == "file"
        assert upload(client, csv_bytes(), "small.csv", trainer.headers).status_code == 201


def test_request_over_max_request_bytes_is_413_from_content_length(make_settings, trainer):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(max_upload_bytes=1000, max_request_bytes=2000))) as client:
        assert_problem(upload(client, b"x" * 5000, "big.csv", trainer.headers), 413, "payload-too-large")


def test_chunked_request_over_max_request_bytes_is_413_while_streaming(make_settings, trainer):
    from fastapi.testclient import TestClient

    from app.main import create_app

    sent = []

    def body():  # no Content-Length: the cap must trip on the streamed bytes
        for _ in range(100):
            sent.append(1)
            yield b"y" * 1000

    with TestClient(create_app(make_settings(max_upload_bytes=1000, max_request_bytes=2000))) as client:
        r = client.post("/v1/datasets", content=body(),
                        headers={**trainer.headers, "Content-Type": "multipart/form-data; boundary=xyz"})
        assert_problem(r, 413, "payload-too-large")


def test_upload_without_file_part_is_422_with_its_location(client, trainer):
    r = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a.csv", b"a")}, headers=trainer.headers)
    body = assert_problem(r, 422, "validation-error")
    assert [e["field"] for e in body["errors"]] == ["body.file"]


def test_upload_with_unknown_format_is_422(client, trainer):
    body = assert_problem(upload(client, csv_bytes(), "a.csv", trainer.headers, format="xlsx"), 422,
                          "validation-error")
    assert body["errors"][0]["field"] == "body.format"


def test_other_content_type_is_415(client, trainer):
    r = client.post("/v1/datasets", content=b"text,label\n", headers={**trainer.headers, "Content-Type": "text/csv"})
    assert_problem(r, 415, "unsupported-media-type")


def test_hf_body_validation_lists_field_locations(client, trainer):
    body = assert_problem(client.post("/v1/datasets", json={"hf": {"split": "train"}}, headers=trainer.headers),
                          422, "validation-error")
    assert "body.hf.name" in [e["field"] for e in body["errors"]]


@pytest.mark.parametrize("name", ["/etc", "/etc/passwd", "../secrets", "~/data", "a/b/c", "./x", "..", "csv", "json",
                                  "parquet", "hf://datasets/a/b", "file:///etc/passwd", "C:\\x", "a/../b", "tests"])
def test_hf_local_paths_are_refused_when_auth_is_on(client, trainer, db, name):
    body = assert_problem(client.post("/v1/datasets", json={"hf": {"name": name}}, headers=trainer.headers),
                          422, "unsafe-data-source")
    assert body["field"] == "hf.name"
    with db.session() as session:  # nothing was recorded
        assert session.scalar(select(func.count()).select_from(Dataset)
                              .where(Dataset.tenant_id == trainer.tenant_id)) == 0


def test_list_paginates_newest_first_with_a_cursor(client, tenant_key):
    key = tenant_key("train")
    ids = [upload(client, csv_bytes(SENTIMENT[i:]), f"{i}.csv", key.headers).json()["id"] for i in range(3)]
    page1 = client.get("/v1/datasets", params={"limit": 2}, headers=key.headers).json()
    assert [d["id"] for d in page1["items"]] == ids[::-1][:2] and page1["next_cursor"]
    page2 = client.get("/v1/datasets", params={"limit": 2, "cursor": page1["next_cursor"]}, headers=key.headers).json()
    assert [d["id"] for d in page2["items"]] == [ids[0]] and page2["next_cursor"] is None


def test_list_with_a_bad_cursor_is_422(client, trainer):
    body = assert_problem(client.get("/v1/datasets", params={"cursor": "garbage"}, headers=trainer.headers), 422,
                          "invalid-input")
    assert body["field"] == "cursor"


def test_get_then_delete_then_404(client, trainer, db):
    created = upload(client, unique_csv(), "x.csv", trainer.headers).json()
    got = client.get(f"/v1/datasets/{created['id']}", headers=trainer.headers)
    assert got.status_code == 200 and got.json() == created
    assert client.delete(f"/v1/datasets/{created['id']}", headers=trainer.headers).status_code == 204
    assert_problem(client.get(f"/v1/datasets/{created['id']}", headers=trainer.headers), 404, "not-found")
    assert_problem(client.delete(f"/v1/datasets/{created['id']}", headers=trainer.headers), 404, "not-found")
    with db.session() as session:  # nothing else used those bytes, so the blob went too
        assert not blobs.contains(session, created["sha256"])


def test_delete_keeps_a_blob_another_dataset_uses(client, trainer, db):
    content = unique_csv()
    a = upload(client, content, "a.csv", trainer.headers).json()
    upload(client, content, "b.csv", trainer.headers)
    assert client.delete(f"/v1/datasets/{a['id']}", headers=trainer.headers).status_code == 204
    with db.session() as session:
        assert blobs.get(session, a["sha256"]) == content


def test_delete_dataset_used_by_a_job_is_409(client, trainer, db):
    created = upload(client, csv_bytes(), "x.csv", trainer.headers).json()
    with db.session() as session:
        job = Job(tenant_id=trainer.tenant_id, task_name="sentiment", base_model="m",
                  train_dataset_id=uuid.UUID(created["id"]), text_fields=["text"], label_field="label",
                  method={"name": "spafit"}, hyperparameters={})
        session.add(job)
        session.commit()
        body = assert_problem(client.delete(f"/v1/datasets/{created['id']}", headers=trainer.headers), 409,
                              "conflict")
        assert str(job.id) in body["detail"]
        assert session.get(Dataset, uuid.UUID(created["id"])) is not None
