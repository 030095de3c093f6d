"""Bugs found by an adversarial pass over the SDK and the CLI (each test fails on the code it was written against,
for the reason its docstring names, and passes once that is fixed). Against the scripted server of
tests/client/stub.py where the real service cannot be made to misbehave on demand, and against nothing at all
where the bug shows before any request is sent."""

from __future__ import annotations

import io
import os
import socket
import zipfile
from collections.abc import Callable

import pytest
from spafit_client import APIConnectionError, Client, RetryPolicy, SpafitError

from tests.cli.conftest import Result
from tests.client.stub import Reply, StubServer, job_json

JOB_ID = "00000000-0000-0000-0000-000000000001"
JOB = f"/v1/jobs/{JOB_ID}"
RESULTS = f"/v1/batch-predictions/{JOB_ID}/results"
FAST = RetryPolicy(max_retries=2, backoff=0.01, max_backoff=0.02)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """tests/cli/conftest.py's `spafit` fixture: `cli(*args, url=..., key=...)` runs the CLI in-process."""
    from click.testing import CliRunner

    from app.cli import main

    for name in ("SPAFIT_URL", "SPAFIT_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, url: str | None = None, key: str | None = None) -> Result:
        env = {k: v for k, v in (("SPAFIT_URL", url), ("SPAFIT_API_KEY", key)) if v is not None}
        return Result(CliRunner().invoke(main, list(args), env=env))

    return run


@pytest.fixture
def stub():
    with StubServer() as s:
        yield s


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def no_traceback(r: Result) -> None:
    """The command ended by an exit code, not by an exception escaping it (a traceback for the user)."""
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r!r}\n--- escaped: {r.exception!r}"


def user_error(r: Result) -> None:
    """A user error: no traceback, a non-zero exit code and a message on stderr."""
    no_traceback(r)
    assert r.exit_code != 0 and "error" in r.stderr.lower(), r


def adapter_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("spafit_adapter.json", "{}")
        z.writestr("adapter.safetensors", b"\0" * 16)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ CLI: user errors
def test_cli_sweep_with_a_non_numeric_grid_value_is_a_usage_error_not_a_traceback(cli, tmp_path):
    """`spafit sweep ... --n1 a` (or `--rank 1e-1`): app/cli/sweep.py `_int_list` calls int()/float() on the raw
    text and the ValueError escapes SpafitGroup (only SDK / core errors are mapped): a traceback, exit 1."""
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    r = cli("sweep", str(tmp_path / "train.csv"), "--task", "t", "--n1", "a", url=closed_url())
    user_error(r)


def test_cli_tasks_import_of_a_folder_that_is_no_adapter_is_an_error_message(cli, tmp_path):
    """`spafit tasks import TASK <some folder>`: the SDK's adapter_archive raises FileNotFoundError ("... is not an
    adapter folder"), which the CLI does not map: a traceback with exit 1 instead of a message."""
    (tmp_path / "notes.txt").write_text("not an adapter")
    r = cli("tasks", "import", "t", str(tmp_path), url=closed_url())
    user_error(r)
    assert "not an adapter folder" in r.stderr, r


def test_cli_predict_file_that_is_not_utf8_is_an_error_message(cli, tmp_path):
    """`spafit predict TASK --file latin1.txt`: click.File("r") decodes lazily, so the UnicodeDecodeError is raised
    while app/cli/predict.py `_read_inputs` iterates, outside any handler: a traceback, exit 1."""
    path = tmp_path / "inputs.txt"
    path.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    r = cli("predict", "t", "--file", str(path), url=closed_url())
    user_error(r)


def test_cli_a_non_ascii_api_key_is_an_error_message(cli):
    """A key pasted with a non-ASCII character: httpx raises UnicodeEncodeError encoding the Authorization header,
    which is neither an SDK error nor mapped by the CLI: a traceback, exit 1 (expected: the auth exit code 4 or a
    usage error)."""
    r = cli("jobs", "list", url=closed_url(), key="spafit_abc_s\u00e9cret")
    user_error(r)


def test_cli_a_malformed_url_is_an_error_message(cli):
    """`--url http://[::1` : httpx.InvalidURL (not a TransportError) escapes the SDK and the CLI: a traceback."""
    r = cli("jobs", "list", url="http://[::1")
    user_error(r)


def test_cli_tasks_export_to_an_unwritable_path_is_an_error_message(cli, stub, tmp_path):
    """`spafit tasks export TASK --out <file>/x.zip`: save_archive's mkdir raises FileExistsError /
    NotADirectoryError, an OSError the CLI does not map: a traceback, exit 1."""
    stub.add("GET", "/v1/tasks/t/adapter", Reply(200, adapter_zip(), {
        "Content-Type": "application/zip", "Content-Disposition": 'attachment; filename="t-v1.zip"'}))
    (tmp_path / "afile").write_text("x")
    r = cli("tasks", "export", "t", "--out", str(tmp_path / "afile" / "x.zip"), url=stub.url)
    user_error(r)


def test_cli_batch_results_into_a_missing_folder_is_an_error_message(cli, stub, tmp_path):
    """`spafit batch results JOB -o missing/dir/out.jsonl`: the download's open() raises FileNotFoundError, not
    mapped by the CLI: a traceback, exit 1 (click.Path(writable=True) does not check a missing parent)."""
    stub.add("GET", RESULTS, Reply(200, b'{"id":0,"label":"a","score":1.0}\n', {"Content-Type": "application/x-ndjson"}))
    r = cli("batch", "results", JOB_ID, "-o", str(tmp_path / "missing" / "out.jsonl"), url=stub.url)
    user_error(r)


# ---------------------------------------------------------------------------------------- SDK: downloads
def test_download_into_a_folder_path_with_a_trailing_slash_writes_the_named_zip_inside(stub, tmp_path, monkeypatch):
    """client/README.md: `client.tasks.download("sentiment", "adapters/")  # adapters/sentiment-v1.zip`. With no
    folder `adapters` yet, save_archive (_endpoints.py) sees Path("adapters/") == Path("adapters"), not a dir, and
    writes the zip as a FILE named `adapters` (so a later download into adapters/ fails or overwrites it)."""
    stub.add("GET", "/v1/tasks/sentiment/adapter", Reply(200, adapter_zip(), {
        "Content-Type": "application/zip", "Content-Disposition": 'attachment; filename="sentiment-v1.zip"'}))
    monkeypatch.chdir(tmp_path)
    with Client(stub.url, retry=FAST) as client:
        path = client.tasks.download("sentiment", "adapters/")
    assert path.resolve() == (tmp_path / "adapters" / "sentiment-v1.zip").resolve(), path
    assert zipfile.is_zipfile(tmp_path / "adapters" / "sentiment-v1.zip")


def test_a_connection_cut_during_a_streamed_download_is_the_sdks_connection_error(stub, tmp_path):
    """README: `APIConnectionError` / `APITimeoutError` when there is no answer, and "Every one is a SpafitError".
    batch.download() and batch.results() stream the body outside `_send`'s handler, so a connection cut mid-body
    raises a bare httpx.RemoteProtocolError (and `spafit batch results` prints a traceback)."""
    cut = Reply(200, b'{"id":0,"label":"a","score":1}\n{"id":1,',
                {"Content-Type": "application/x-ndjson", "Content-Length": "500"})
    stub.add("GET", RESULTS, cut)
    with Client(stub.url, retry=FAST) as client:
        with pytest.raises(APIConnectionError):
            client.batch.download(JOB_ID, tmp_path / "out.jsonl")
        with pytest.raises(APIConnectionError):
            list(client.batch.results(JOB_ID))


def test_cli_batch_results_cut_mid_stream_exits_unreachable_without_a_traceback(cli, stub):
    """The same cut seen from `spafit batch results JOB` (stdout): exit 5 (unreachable) expected, a traceback seen."""
    stub.add("GET", RESULTS, Reply(200, b'{"id":0,"label":"a","score":1}\n{"id":1,',
                                   {"Content-Type": "application/x-ndjson", "Content-Length": "500"}))
    r = cli("batch", "results", JOB_ID, url=stub.url)
    no_traceback(r)
    assert r.exit_code == 5, r


# ------------------------------------------------------------------------------------------ SDK: retries
def test_a_retried_cancel_whose_first_attempt_went_through_does_not_raise_conflict(stub):
    """jobs.cancel is retried (README: "safe to repeat"). When the first attempt reached the service and cancelled
    the job but its answer was lost (here: a read timeout), the retry is answered 409 "already cancelled" and the
    caller gets ConflictError for a cancel that succeeded. Expected: the cancelled job."""
    cancelled = job_json(status="cancelled", cancel_requested=True)
    stub.add("POST", f"{JOB}/cancel", Reply(200, cancelled, delay=1.0),
             Reply(409, {"type": "https://spafit.dev/problems/conflict", "title": "Conflict", "status": 409,
                         "detail": f"job {JOB_ID} already cancelled; only queued or running jobs can be cancelled"}))
    stub.add("GET", JOB, Reply(200, cancelled))
    with Client(stub.url, timeout=0.3, retry=FAST) as client:
        job = client.jobs.cancel(JOB_ID)
    assert job.status == "cancelled"
    assert len(stub.seen("POST", f"{JOB}/cancel")) == 2


# ------------------------------------------------------------------------------------------ SDK: uploads
def test_upload_accepts_an_unnamed_binary_file_such_as_a_temporary_file(tmp_path):
    """README: `datasets.upload` takes "a path, bytes or a binary file" (and import_adapter a zip as a file).
    tempfile.TemporaryFile() is a binary file whose `.name` is its descriptor (an int): _endpoints.py `_read` does
    Path(getattr(source, "name", ...)) and raises TypeError before any request. Expected: the upload is sent
    (here, to nothing: APIConnectionError)."""
    import tempfile

    with tempfile.TemporaryFile() as f, Client(closed_url(), retry=FAST) as client:
        f.write(b"text,label\ngood,pos\nbad,neg\n")
        f.seek(0)
        assert isinstance(f.name, int)
        with pytest.raises(APIConnectionError):
            client.datasets.upload(f)
        f.seek(0)
        with pytest.raises(APIConnectionError):
            client.tasks.import_adapter("t", f)


def test_upload_of_jsonl_bytes_infers_the_format(client, tenant_key):
    """`datasets.upload(bytes)`: "Fields not given are inferred (text columns, the label column, the format)". The SDK
    names every bytes upload `data.csv` (_endpoints.py `_read`), and the service takes a known extension over
    sniffing the content, so JSON Lines (or TSV) bytes are parsed as CSV: 422 "no label column found"."""
    import json

    key = tenant_key("train")
    rows = [{"text": f"good fun {i}" if i % 2 else f"bad boring {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(20)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with Client("http://testserver", api_key=key.key, http_client=client) as sdk:
        dataset = sdk.datasets.upload(data)
    assert dataset.format == "jsonl" and dataset.rows == 20 and dataset.label_field == "label"


def test_a_retried_delete_whose_first_attempt_went_through_does_not_raise_not_found(stub):
    """DELETEs are retried (README: "safe to repeat"). When the first attempt deleted the job but its answer was lost
    (a read timeout), the retry is answered 404 and `jobs.delete` raises NotFoundError for a delete that succeeded
    (the same for datasets.delete and tasks.delete). Expected: None, as for a delete answered at once."""
    stub.add("DELETE", JOB, Reply(204, b"", delay=1.0),
             Reply(404, {"type": "https://spafit.dev/problems/not-found", "title": "Not found", "status": 404,
                         "detail": f"job {JOB_ID} not found"}))
    with Client(stub.url, timeout=0.3, retry=FAST) as client:
        assert client.jobs.delete(JOB_ID) is None
    assert len(stub.seen("DELETE", JOB)) == 2


# ------------------------------------------------------------------------------ SDK / CLI: not the service
def test_an_answer_that_is_not_the_services_json_is_a_spafit_error(stub):
    """README: "Every one is a SpafitError". A 200 whose body is not the expected JSON (the URL points at another web
    server, a proxy's HTML page, a captive portal) makes `parse` (_base.py) raise pydantic_core.ValidationError,
    which is no SpafitError (and is easily confused with the SDK's own 422 `ValidationError`)."""
    stub.add("GET", "/v1/jobs", Reply(200, "<html>not the service</html>", {"Content-Type": "text/html"}))
    with Client(stub.url, retry=FAST) as client, pytest.raises(SpafitError):
        list(client.jobs.list())


def test_cli_pointed_at_something_that_is_not_the_service_exits_with_a_message(cli, stub):
    """The same from `spafit jobs list --url <another web server>`: the pydantic error escapes, a traceback."""
    stub.add("GET", "/v1/jobs", Reply(200, "<html>not the service</html>", {"Content-Type": "text/html"}))
    r = cli("jobs", "list", url=stub.url)
    user_error(r)


def test_async_a_connection_cut_during_a_streamed_download_is_the_sdks_connection_error(stub, tmp_path):
    """The async twin of the streamed-download cut (AsyncBatchPredictions.download / results): bare httpx errors."""
    import asyncio

    from spafit_client import AsyncClient

    stub.add("GET", RESULTS, Reply(200, b'{"id":0,"label":"a","score":1}\n{"id":1,',
                                   {"Content-Type": "application/x-ndjson", "Content-Length": "500"}))

    async def main() -> None:
        async with AsyncClient(stub.url, retry=FAST) as client:
            with pytest.raises(APIConnectionError):
                await client.batch.download(JOB_ID, tmp_path / "out.jsonl")
            with pytest.raises(APIConnectionError):
                [row async for row in client.batch.results(JOB_ID)]

    asyncio.run(main())


# ------------------------------------------------------------------------------ CLI: admin, database down
def test_cli_keys_with_the_database_down_is_an_error_message(cli, monkeypatch):
    """`spafit keys list --tenant x` (also keys create / revoke, db gc) while the database is unreachable: the
    driver's OperationalError escapes SpafitGroup (app/cli/common.py maps only SDK and core errors): a traceback with
    exit 1. Expected: a message, and the documented exit code 5 (unreachable) or at least no traceback."""
    from app.settings import get_settings

    port = closed_url().rsplit(":", 1)[1]
    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPAFIT_MODE", "server")
    monkeypatch.setenv("SPAFIT_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing")
    monkeypatch.setenv("SPAFIT_BROKER_URL", f"redis://127.0.0.1:{port}/0")  # server mode needs one; not used here
    get_settings.cache_clear()
    try:
        r = cli("keys", "list", "--tenant", "x")
    finally:
        get_settings.cache_clear()
    user_error(r)


def test_cli_keys_with_an_invalid_configuration_is_an_error_message(cli, monkeypatch):
    """`spafit keys list` in server mode without SPAFIT_BROKER_URL: get_settings() raises pydantic's ValidationError
    ("server mode needs SPAFIT_BROKER_URL"), which SpafitGroup does not map: the right words, but inside a
    traceback with exit 1. Expected: the message alone and a usage / invalid exit code."""
    from app.settings import get_settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPAFIT_MODE", "server")
    monkeypatch.setenv("SPAFIT_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/nothing")
    get_settings.cache_clear()
    try:
        r = cli("keys", "list", "--tenant", "x")
    finally:
        get_settings.cache_clear()
    user_error(r)
    assert "SPAFIT_BROKER_URL" in r.stderr, r
