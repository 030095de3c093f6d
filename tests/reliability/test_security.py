"""Security properties not covered elsewhere (see benchmarks/RELIABILITY.md for the ones that are):
keys compared in constant time whatever the key, odd names and traversal attempts in task names and upload
file names refused or made harmless, multipart limits answered 4xx, and no internals in any error."""

from __future__ import annotations

import hmac
import os

import pytest

from app.security import hash_secret, parse_key
from tests.api.helpers import assert_problem, unique_csv, upload

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
