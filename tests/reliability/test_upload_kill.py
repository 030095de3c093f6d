"""The API process SIGKILLed during an upload: no partial dataset is ever visible, nothing is left on disk,
and the restarted API accepts the same upload. The API runs as deployed (`spafit serve --no-worker`, server
mode); the upload is a multipart body written slowly over a raw socket so the kill lands mid-body."""

from __future__ import annotations

import io
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import func, select

from app.models import Blob, Dataset

from .conftest import ROOT, ApiProcess, service_env

pytestmark = pytest.mark.slow

ROWS = 120_000  # about 5 MiB of CSV: parsing and storing it takes a noticeable moment


def _big_csv() -> bytes:
    tag = secrets.token_hex(6)
    out = io.StringIO()
    out.write("text,label\n")
    for i in range(ROWS):
        out.write(f"review {tag} number {i} was {'great fun' if i % 2 else 'dull and slow'},{'pos' if i % 2 else 'neg'}\n")
    return out.getvalue().encode()


def _multipart(content: bytes) -> tuple[bytes, str]:
    boundary = f"----spafit{secrets.token_hex(8)}"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), boundary


def _open_upload(api: ApiProcess, key: str, body_len: int, boundary: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    sock.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {body_len}\r\n"
                  "Connection: close\r\n\r\n").encode())
    return sock


def _send(sock: socket.socket, data: bytes, chunk: int = 64 * 1024, pause: float = 0.0) -> None:
    for i in range(0, len(data), chunk):
        sock.sendall(data[i:i + chunk])
        if pause:
            time.sleep(pause)


def _state(db, tenant_id: uuid.UUID, since: datetime) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(the tenant's datasets, every blob written since `since`) as (sha256, size) pairs."""
    with db.session() as s:
        datasets = s.execute(select(Dataset.sha256, Dataset.size_bytes).where(Dataset.tenant_id == tenant_id)).all()
        new_blobs = s.execute(select(Blob.sha256, Blob.size).where(Blob.created_at >= since)).all()
    return [tuple(r) for r in datasets], [tuple(r) for r in new_blobs]


def _assert_all_or_nothing(db, tenant_id: uuid.UUID, since: datetime, content: bytes) -> bool:
    """Either the whole upload is registered (row + its complete, verified blob) or nothing of it is."""
    from tests.api.helpers import sha256

    datasets, new_blobs = _state(db, tenant_id, since)
    if not datasets:
        assert new_blobs == [], f"a blob without its dataset: {new_blobs}"
        return False
    assert set(datasets) == {(sha256(content), len(content))} and new_blobs == [datasets[0]]
    with db.session() as s:
        data = s.scalar(select(Blob.data).where(Blob.sha256 == sha256(content)))
    assert bytes(data) == content
    return True


@pytest.fixture
def api_env(pg_url, redis_url, redis_client, rel_prefix, tiny_base, tmp_path):
    env = service_env(pg_url, redis_url, rel_prefix, tiny_base, tmp_path / "data")
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # where a multipart parser would spool a large file
    return env


def test_api_killed_mid_upload_leaves_no_partial_dataset(api_env, tmp_path, tenant_key, db, measure):
    key = tenant_key("train")
    content = _big_csv()
    body, boundary = _multipart(content)
    since = datetime.now(UTC)
    api = ApiProcess(api_env, tmp_path / "api.log").start()
    try:
        sock = _open_upload(api, key.key, len(body), boundary)
        _send(sock, body[: len(body) // 2], pause=0.002)
        # Mid-body, from another connection: nothing of the upload is visible.
        listed = httpx.get(f"{api.url}/v1/datasets", headers=key.headers, timeout=10)
        assert listed.status_code == 200 and listed.json()["items"] == []
        api.kill9()
        sock.close()
        assert _state(db, key.tenant_id, since) == ([], [])
        assert list((tmp_path / "tmp").iterdir()) == []  # no spooled half file left on disk

        # Killed just after the last byte (while the service parses and stores it): all or nothing.
        api = ApiProcess(api_env, tmp_path / "api.log", port=api.port).start()
        sock = _open_upload(api, key.key, len(body), boundary)
        _send(sock, body)
        time.sleep(0.2)
        api.kill9()
        sock.close()
        registered = _assert_all_or_nothing(db, key.tenant_id, since, content)

        # The restarted API takes the same upload (or already has it, whole).
        api = ApiProcess(api_env, tmp_path / "api.log", port=api.port).start()
        r = httpx.post(f"{api.url}/v1/datasets", files={"file": ("big.csv", content)}, headers=key.headers,
                       timeout=120)
        assert r.status_code == 201, r.text
        assert r.json()["rows"] == ROWS and r.json()["size_bytes"] == len(content)
        measure(upload_bytes=len(content), killed_at_byte=len(body) // 2,
                killed_after_body=("registered whole" if registered else "absent"))
        assert _assert_all_or_nothing(db, key.tenant_id, since, content)
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant_id == key.tenant_id)) \
                == 1 + registered
    finally:
        api.stop()


def test_the_api_picks_its_temporary_directory_when_it_starts(tmp_path):
    """Python picks its temporary directory on first use by writing and deleting a scratch file there. In the API
    that first use was the first upload to spill to disk, so the kill above once landed inside it and left an
    empty scratch file in TMPDIR (CI). `create_app()` makes that choice at start."""
    (tmp_path / "t").mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")},
           "TMPDIR": str(tmp_path / "t"), "SPAFIT_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    code = ("import tempfile\nfrom app.main import create_app\nbefore = tempfile.tempdir\ncreate_app()\n"
            "print(before, tempfile.tempdir)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert after == str(tmp_path / "t") and list((tmp_path / "t").iterdir()) == [], (before, after)
