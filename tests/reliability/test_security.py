"""Security properties not covered elsewhere (see benchmarks/RELIABILITY.md, "Security", for the list):
keys compared in constant time whatever the key, odd names and traversal attempts in task names and upload
file names refused or made harmless, multipart limits answered 4xx, and no internals in any error; and the
network edges: a foreign Host (DNS rebinding) and a cross-origin state-changing request without a key are
refused, `spafit serve` binds only loopback with auth off unless told otherwise, `/metrics` is closed in server
mode unless opened with a scrape token or served on its own address. (Route x scope: test_route_walk.py.)"""

from __future__ import annotations

import hmac
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.security import hash_secret, is_loopback, parse_key
from tests.api.helpers import assert_problem, csv_bytes, unique_csv, upload
from tests.live import ROOT, ApiProcess, free_port

LEAKS = ("Traceback", 'File "', "sqlalchemy", "psycopg", "site-packages", "/work/")


def _no_leaks(r) -> None:
    for leak in LEAKS:
        assert leak not in r.text, r.text[:500]


def test_every_key_check_goes_through_one_constant_time_comparison(client, tenant_key, monkeypatch):
    """Right key, right prefix with a wrong secret, unknown prefix, revoked-looking garbage: each request
    costs exactly one `hmac.compare_digest` of two sha256 hex digests, so timing tells nothing about which
    prefixes exist or how much of a secret matched. The stored hash is never the secret."""
    import app.security as security

    calls: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", recording)
    key = tenant_key("train")
    prefix, secret = parse_key(key.key)
    presented = {
        "right": key.key,
        "wrong secret": f"spafit_{prefix}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",
        "unknown prefix": f"spafit_{'0' * 12}_{secret}",
        "short secret": f"spafit_{prefix}_x",
    }
    for name, k in presented.items():
        calls.clear()
        r = client.get("/v1/datasets", headers={"Authorization": f"Bearer {k}"})
        assert r.status_code == (200 if name == "right" else 401), (name, r.text)
        assert len(calls) == 1, (name, calls)
        a, b = calls[0]
        assert len(a) == len(b) == 64, name  # equal-length digests, whatever was presented
        assert secret not in (a, b)
    assert hash_secret(secret) != secret


@pytest.mark.parametrize("filename", ["../../../../tmp/spafit-pwn.csv", "..\\..\\windows\\evil.csv", "/etc/passwd.csv",
                                      "C:\\temp\\x.csv", "a/b/../../c.csv", "%2e%2e%2fx.csv", "ｆｕｌｌ.csv", " .csv"])
def test_upload_file_names_are_labels_never_paths(client, tenant_key, filename, tmp_path):
    key = tenant_key("train")
    before = set(os.listdir("/tmp"))
    r = upload(client, unique_csv(), filename, headers=key.headers)
    _no_leaks(r)
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    assert "/" not in name and "\\" not in name and name == filename.replace("\\", "/").rsplit("/", 1)[-1]
    assert not os.path.exists("/tmp/spafit-pwn.csv")
    assert {f for f in set(os.listdir("/tmp")) - before if "spafit-pwn" in f or "evil" in f} == set()


@pytest.mark.parametrize("task", ["abc%0A", "abc%0D", "abc%00", "a%2Fb", "%2E", "t%C3%A2sk", "%EF%BD%94ask", "..",
                                  "abc%20", "-abc", "_", "a" * 65])
def test_odd_task_names_are_refused_on_every_task_route(client, tenant_key, task):
    key = tenant_key("train", "predict")
    routes = [("GET", f"/v1/tasks/{task}"), ("GET", f"/v1/tasks/{task}/versions"), ("DELETE", f"/v1/tasks/{task}"),
              ("GET", f"/v1/tasks/{task}/adapter"), ("POST", f"/v1/tasks/{task}/versions/1/activate"),
              ("POST", f"/v1/tasks/{task}/predict"), ("PUT", f"/v1/tasks/{task}/adapter")]
    for method, path in routes:
        kw = {"json": {"inputs": ["good"]}} if path.endswith("predict") else {}
        headers = dict(key.headers)
        if method == "PUT":
            kw = {"content": b"PK\x05\x06" + b"\0" * 18}
            headers["Content-Type"] = "application/zip"
        r = client.request(method, path, headers=headers, **kw)
        _no_leaks(r)
        assert r.status_code in (404, 422), (method, path, r.status_code, r.text)
    r = client.post("/v1/predict", json={"tasks": [task.replace("%0A", "\n").replace("%00", "\0")], "inputs": ["x"]},
                    headers=key.headers)
    assert r.status_code == 422, r.text
    assert client.get("/v1/tasks", headers=key.headers).json()["items"] == []


def test_multipart_limits_are_4xx_problems(client, tenant_key):
    key = tenant_key("train")
    two_files = {"file": ("a.csv", unique_csv()), "other": ("b.csv", unique_csv())}
    r = client.post("/v1/datasets", files=two_files, headers=key.headers)
    _no_leaks(r)
    assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/problem+json"), r.text
    many = {f"f{i}": "x" for i in range(40)}
    r = client.post("/v1/datasets", files={"file": ("a.csv", unique_csv())}, data=many, headers=key.headers)
    _no_leaks(r)
    assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/problem+json"), r.text
    broken = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\ntext,label\r\n"
    r = client.post("/v1/datasets", content=broken, headers={**key.headers,
                                                             "Content-Type": "multipart/form-data; boundary=xyz"})
    _no_leaks(r)
    assert 400 <= r.status_code < 500, r.text
    assert client.get("/v1/datasets", headers=key.headers).json()["items"] == []


def test_json_that_is_not_utf8_is_a_documented_400(client, tenant_key):
    key = tenant_key("train", "predict")
    paths = client.get("/openapi.json").json()["paths"]
    for path, template in (("/v1/jobs", "/v1/jobs"), ("/v1/predict", "/v1/predict"),
                           ("/v1/tasks/x/predict", "/v1/tasks/{task}/predict")):
        r = client.post(path, content=b"\xff\xfe{", headers={**key.headers, "Content-Type": "application/json"})
        _no_leaks(r)
        assert_problem(r, 400)
        assert "400" in paths[template]["post"]["responses"]


# ------------------------------------------------------------------------------------ the network edges

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[Any]:
    """What `spafit serve` gives a local user: embedded mode, auth off, SQLite; reached as http://localhost."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SPAFIT_") and not name.startswith("SPAFIT_TEST_"):
                mp.delenv(name)
        settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("embedded"), preload_base_model=False)
        assert settings.auth_enabled is False and settings.mode == "embedded"
        with TestClient(create_app(settings), base_url="http://localhost:8000") as client:
            yield client


def _dataset_count(client: Any) -> int:
    return len(client.get("/v1/datasets").json()["items"])


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "attacker.localhost.evil.example",
                                  "127.0.0.1.evil.example", "localhost.evil.example", "", "[::1", "a b"])
def test_a_foreign_host_is_refused_before_anything_runs(embedded, host):
    """DNS rebinding: the attacker's name now resolves to 127.0.0.1, so the page's requests are same-origin
    to the browser, but they still say `Host: evil.example`."""
    before = _dataset_count(embedded)
    for method, path, kw in (("GET", "/v1/datasets", {}), ("GET", "/v1/tasks", {}), ("GET", "/dashboard", {}),
                             ("POST", "/v1/datasets", {"files": {"file": ("x.csv", unique_csv())}})):
        r = embedded.request(method, path, headers={"Host": host}, **kw)
        _no_leaks(r)
        assert_problem(r, 400, "untrusted-host")
    assert _dataset_count(embedded) == before


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1:8000", "[::1]:8000",
                                  "localhost."])
def test_loopback_names_are_answered_in_embedded_mode(embedded, host):
    assert embedded.get("/v1/tasks", headers={"Host": host}).status_code == 200


def test_health_probes_answer_whatever_the_host(embedded):
    """Orchestrators probe by IP; liveness and readiness hold nothing a rebound page could use."""
    for host in ("10.1.2.3:8000", "evil.example", ""):
        assert embedded.get("/healthz", headers={"Host": host}).status_code == 200
        assert embedded.get("/readyz", headers={"Host": host}).status_code in (200, 503)
        assert_problem(embedded.post("/healthz", headers={"Host": host}), 400, "untrusted-host")
        assert_problem(embedded.get("/healthz/", headers={"Host": host}), 400, "untrusted-host")


# (The scheme is not compared: one host and port is one listener, and behind a TLS proxy the app sees http while
# the page's origin is https.)
@pytest.mark.parametrize("origin", [EVIL, "null", "http://localhost:3000", "http://127.0.0.1:8000", "http://localhost:8000.evil.example", "file://",
                                    "http://localhost:8000/path", "garbage"])
def test_a_cross_origin_upload_without_a_key_is_refused(embedded, origin):
    """A page elsewhere (even another port of this machine) submits a multipart form to the local service:
    no preflight protects that, so the Origin check does. Nothing is stored."""
    before = _dataset_count(embedded)
    r = upload(embedded, unique_csv(), headers={"Origin": origin})
    _no_leaks(r)
    assert_problem(r, 403, "cross-origin-refused")
    for method, path in (("POST", "/v1/jobs"), ("DELETE", "/v1/tasks/x"), ("PUT", "/v1/tasks/x/adapter"),
                         ("PATCH", "/v1/jobs"), ("POST", "/v1/predict")):
        assert_problem(embedded.request(method, path, content=b"{}", headers={"Origin": origin,
                                                                             "Content-Type": "text/plain"}),
                       403, "cross-origin-refused")
    assert _dataset_count(embedded) == before


def test_a_cross_site_request_without_origin_is_refused_by_its_fetch_metadata(embedded):
    before = _dataset_count(embedded)
    for site in ("cross-site", "same-site"):
        r = upload(embedded, unique_csv(), headers={"Sec-Fetch-Site": site})
        assert_problem(r, 403, "cross-origin-refused")
    assert _dataset_count(embedded) == before


def test_same_origin_and_non_browser_requests_pass(embedded):
    """The dashboard (served by the app itself: its Origin is the app's) and clients that are not browsers
    (no Origin at all) work; reading cross-origin is left to the browser's same-origin policy (no CORS)."""
    for headers in ({"Origin": "http://localhost:8000"}, {}, {"Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}, {"Origin": "http://LOCALHOST:8000/"}):
        assert upload(embedded, unique_csv(), headers=headers).status_code == 201, headers
    r = embedded.get("/v1/datasets", headers={"Origin": EVIL})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_the_scheme_default_port_matches_a_host_without_one(make_settings):
    """Behind a TLS proxy: `Host: api.example.com` and `Origin: https://api.example.com` are one origin."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(allowed_hosts="api.example.com"))) as client:
        for origin, status in (("https://api.example.com", 401), ("http://api.example.com", 401),
                               ("https://api.example.com:8443", 403), ("https://evil.example", 403)):
            r = client.post("/v1/jobs", json={}, headers={"Host": "api.example.com", "Origin": origin})
            assert r.status_code == status, (origin, r.text)  # 401: past the Origin check, at auth


def test_server_mode_answers_only_the_configured_hosts(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    key = tenant_key("train")
    with TestClient(create_app(make_settings(allowed_hosts="api.example.com,*.internal.example"))) as client:
        for host, status in (("api.example.com", 200), ("API.example.com:443", 200), ("a.internal.example", 200),
                             ("internal.example", 400), ("evil.example", 400), ("testserver", 400)):
            r = client.get("/v1/datasets", headers={**key.headers, "Host": host})
            assert r.status_code == status, (host, r.text)


def test_a_cross_origin_request_with_a_key_is_left_to_auth_and_cors(make_settings, tenant_key):
    """A key can only be sent cross-origin after a CORS preflight (it is a non-safelisted header), so requests
    carrying one are not Origin-checked; CORS-allowed origins pass without a key (and then meet auth)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    key = tenant_key("train")
    with TestClient(create_app(make_settings(cors_origins="https://app.example.com"))) as client:
        assert upload(client, unique_csv(), headers={**key.headers, "Origin": EVIL}).status_code == 201
        assert upload(client, unique_csv(), headers={"X-API-Key": key.key, "Origin": EVIL}).status_code == 201
        assert_problem(upload(client, unique_csv(), headers={"Origin": "https://app.example.com"}), 401,
                       "unauthorized")
        assert_problem(upload(client, unique_csv(), headers={"Origin": EVIL}), 403, "cross-origin-refused")
        # Basic credentials a browser may attach by itself are not a key.
        assert_problem(upload(client, unique_csv(), headers={"Origin": EVIL, "Authorization": "Basic dTpw"}), 403,
                       "cross-origin-refused")
        preflight = client.options("/v1/datasets", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Headers": "authorization"})
        assert preflight.headers.get("access-control-allow-origin") is None


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                            ("127.8.9.10", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False),
                                            ("::", False), ("::ffff:192.0.2.1", False),
                                            ("192.168.1.4", False), ("example.com", False), ("", False),
                                            ("localhost.example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("insecure_bind", [False, True])
def test_auth_off_refuses_requests_that_arrive_on_a_network_address(tmp_path, insecure_bind):
    """`uvicorn app.main:create_app --factory --host 0.0.0.0` (or a container in embedded mode) bypasses the
    CLI's bind check: the app itself then refuses what reaches it on a non-loopback address of the machine
    (the ASGI scope's `server`), unless insecure_bind says it is meant."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SPAFIT_") and not name.startswith("SPAFIT_TEST_"):
                mp.delenv(name)
        settings = Settings(_env_file=None, data_dir=tmp_path / "data", preload_base_model=False,
                            allowed_hosts="192.0.2.10,localhost", insecure_bind=insecure_bind)
        app = create_app(settings)
        with TestClient(app, base_url="http://192.0.2.10:8000") as network, \
                TestClient(app, base_url="http://localhost:8000") as local:
            r = network.get("/v1/tasks")
            if insecure_bind:
                assert r.status_code == 200, r.text
            else:
                assert_problem(r, 403, "loopback-only")
                assert_problem(upload(network, unique_csv()), 403, "loopback-only")
            assert local.get("/v1/tasks").status_code == 200
            assert local.get("/v1/datasets").json()["items"] == []


def test_a_wildcard_cors_origin_does_not_open_keyless_writes(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    key = tenant_key("train")
    with TestClient(create_app(make_settings(cors_origins="*"))) as client:
        assert_problem(upload(client, unique_csv(), headers={"Origin": EVIL}), 403, "cross-origin-refused")
        assert upload(client, unique_csv(), headers={**key.headers, "Origin": EVIL}).status_code == 201


def _clean_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update({"SPAFIT_DATA_DIR": str(tmp_path / "data"), "SPAFIT_PRELOAD_BASE_MODEL": "false",
                "PYTHONPATH": str(ROOT)}, **extra)
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_serve_with_auth_off_refuses_a_non_loopback_host(tmp_path, host):
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--host", host, "--port",
                          str(free_port())], env=_clean_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert "--insecure-bind" in out.stderr and "auth is off" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


def _network_address() -> str | None:
    """A non-loopback IPv4 address of this machine (the one a route to TEST-NET would leave from), if any."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: no packet is sent
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if is_loopback(address) or address == "0.0.0.0" else address


def test_serve_insecure_bind_warns_and_still_refuses_foreign_hosts_and_origins(tmp_path):
    """--insecure-bind is heard, logged as a warning, handed to the app (which then answers on the network
    address too), and the Host and Origin checks still hold on the real server."""
    api = ApiProcess(_clean_env(tmp_path), tmp_path / "serve.log")
    api.args[api.args.index("127.0.0.1")] = "0.0.0.0"
    api.args.append("--insecure-bind")
    api.start()
    try:
        log = api.tail()
        assert "INSECURE BIND" in log and "WARNING" in log
        assert httpx.get(api.url + "/v1/tasks").status_code == 200
        r = httpx.get(api.url + "/v1/tasks", headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["type"].endswith("/untrusted-host")
        r = httpx.post(api.url + "/v1/datasets", files={"file": ("a.csv", csv_bytes())}, headers={"Origin": EVIL})
        assert r.status_code == 403 and r.json()["type"].endswith("/cross-origin-refused")
        assert httpx.get(api.url + "/v1/datasets").json()["items"] == []
        address = _network_address()
        if address is not None:  # reached on the machine's own network address, with a Host it answers to
            r = httpx.get(f"http://{address}:{api.port}/v1/tasks", headers={"Host": "localhost"})
            assert r.status_code == 200, r.text
    finally:
        api.stop()


def test_uvicorn_by_hand_on_all_interfaces_with_auth_off_answers_only_on_loopback(tmp_path):
    """The bypass of `spafit serve`'s check, run for real: uvicorn itself on 0.0.0.0 in embedded mode."""
    port = free_port()
    log = open(tmp_path / "uvicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0",
                             "--port", str(port)], env=_clean_env(tmp_path), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        from tests.live import wait_until

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None

        wait_until(up, 60, "uvicorn")
        assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()[-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/tasks").status_code == 200
        address = _network_address()
        if address is not None:
            r = httpx.get(f"http://{address}:{port}/v1/tasks", headers={"Host": "localhost"})
            assert r.status_code == 403 and r.json()["type"].endswith("/loopback-only"), r.text
            r = httpx.post(f"http://{address}:{port}/v1/datasets", files={"file": ("a.csv", csv_bytes())},
                           headers={"Host": "localhost"})
            assert r.status_code == 403
        assert httpx.get(f"http://127.0.0.1:{port}/v1/datasets").json()["items"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


# ------------------------------------------------------------------------------------ /metrics

TOKEN = "scrape-token-" + "0" * 20


def test_metrics_are_closed_in_server_mode_by_default(client, tenant_key):
    for headers in ({}, tenant_key("admin").headers, {"Authorization": f"Bearer {TOKEN}"}):
        body = assert_problem(client.get("/metrics", headers=headers), 404, "not-found")
        assert "SPAFIT_METRICS_TOKEN" in body["detail"]


def test_metrics_with_a_scrape_token(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(metrics_token=TOKEN))) as client:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"},
                        {"X-API-Key": TOKEN}, tenant_key("admin").headers):
            r = client.get("/metrics", headers=headers)
            assert_problem(r, 401, "unauthorized")
            assert TOKEN not in r.text
        r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "spafit_http_request_duration_seconds" in r.text


def test_metrics_on_their_own_address(make_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    port = free_port()
    with TestClient(create_app(make_settings(metrics_bind=f"127.0.0.1:{port}", metrics_token=TOKEN))) as client:
        assert_problem(client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}), 404, "not-found")
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200 and "spafit_http_request_duration_seconds" in r.text
    with pytest.raises(httpx.TransportError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_are_open_on_loopback_in_embedded_mode(embedded):
    assert embedded.get("/metrics").status_code == 200


@pytest.mark.parametrize("values, error", [
    ({"metrics_token": "short"}, "at least 16"),
    ({"metrics_bind": "9100"}, "host:port"),
    ({"metrics_bind": "0.0.0.0:99999"}, "host:port"),
])
def test_unsafe_metrics_settings_are_refused(values, error):
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match=error):
        Settings(_env_file=None, **values)


def test_an_empty_scrape_token_means_none_not_an_empty_password():
    from app.settings import Settings

    s = Settings(_env_file=None, mode="server", database_url="postgresql://x@h/x", broker_url="redis://h",
                 metrics_token="", metrics_bind="")
    assert s.metrics_token is None and s.metrics_bind is None and not s.metrics_on_api_port
    assert s.allowed_hosts == ["*"]
    assert Settings(_env_file=None).allowed_hosts == ["localhost", "127.0.0.1", "::1"]
