"""The content-addressed blob store: idempotent writes, verified reads."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import update

from app.errors import BlobIntegrityError, NotFound
from app.models import Blob
from app.services import blobs


def test_put_is_idempotent_and_get_returns_the_bytes(db):
    data = secrets.token_bytes(1000)
    with db.transaction() as session:
        sha = blobs.put(session, data)
        assert blobs.put(session, data) == sha == blobs.sha256_hex(data)
    with db.session() as session:
        assert blobs.get(session, sha) == data and blobs.size(session, sha) == 1000


def test_corrupted_blob_is_refused_on_read(db):
    with db.transaction() as session:
        sha = blobs.put(session, secrets.token_bytes(64))
        session.execute(update(Blob).where(Blob.sha256 == sha).values(data=b"tampered"))
    with db.session() as session, pytest.raises(BlobIntegrityError):
        blobs.get(session, sha)


def test_missing_blob_is_not_found(db):
    with db.session() as session, pytest.raises(NotFound):
        blobs.get(session, "0" * 64)
