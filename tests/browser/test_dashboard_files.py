"""The dashboard's files without a browser: served with the right types and cache headers, every asset the
page loads is there, the scripts call only the public API (/v1 and health) and nothing off the origin, and
the new-job form's defaults are the API's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.routes.dashboard import STATIC_DIR

ASSETS = STATIC_DIR / "assets"
SCRIPTS = sorted(ASSETS.glob("*.js"))
JS_TYPES = ("text/javascript", "application/javascript")


def test_root_redirects_to_the_page_which_is_served_with_its_headers(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard"
    assert client.get("/dashboard/", follow_redirects=False).headers["location"] == "/dashboard"
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert '<script type="module" src="/dashboard/assets/app.js">' in page.text


def _referenced_assets(html: str) -> set[str]:
    """Every asset index.html loads, and every module those modules import, as /dashboard/assets/ paths."""
    found = set(re.findall(r'(?:src|href)="(/dashboard/assets/[^"]+)"', html))
    for script in SCRIPTS:
        for name in re.findall(r'from\s+"\./([\w.-]+)"', script.read_text()):
            found.add(f"/dashboard/assets/{name}")
    return found


def test_every_asset_is_served_with_its_type_and_revalidates(client):
    html = client.get("/dashboard").text
    paths = _referenced_assets(html)
    assert {"/dashboard/assets/app.js", "/dashboard/assets/style.css", "/dashboard/assets/api.js"} <= paths
    assert {f"/dashboard/assets/{p.name}" for p in SCRIPTS} <= paths | {"/dashboard/assets/app.js"}
    for path in sorted(paths):
        r = client.get(path)
        assert r.status_code == 200, path
        kind = r.headers["content-type"].split(";")[0]
        assert kind in (JS_TYPES if path.endswith(".js") else ("text/css",)), (path, kind)
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"] == "nosniff"
        again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, path
    assert client.get("/dashboard/assets/missing.js").status_code == 404
    assert client.get("/dashboard/assets/index.html").status_code == 404  # the page only at /dashboard


def test_the_dashboard_is_not_in_the_api_description(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/dashboard")]


def _sources() -> dict[Path, str]:
    files = [*SCRIPTS, ASSETS / "style.css", STATIC_DIR / "index.html"]
    return {p: p.read_text() for p in files}


def _code(js: str) -> str:
    """The script without its comments."""
    return re.sub(r"(^|\s)//.*$", r"\1", re.sub(r"/\*.*?\*/", "", js, flags=re.S), flags=re.M)


def test_scripts_call_only_the_public_api():
    sources = {p: _code(s) for p, s in _sources().items() if p.suffix == ".js"}
    # One place calls fetch(): api.js, which refuses any path outside /v1/ and the health endpoints.
    assert [p.name for p, s in sources.items() if re.search(r"\bfetch\(", s)] == ["api.js"]
    assert "/^\\/(v1\\/|healthz$|readyz$)/" in sources[ASSETS / "api.js"]
    assert not [p.name for p, s in sources.items() if re.search(r"\b(XMLHttpRequest|EventSource|WebSocket|sendBeacon)\b", s)]
    # Every path literal in the scripts is an API path.
    paths = {m for s in sources.values() for m in re.findall(r"""["'`](/[^"'`\s$]+)""", s)}
    assert paths, "no API paths found: the pattern is stale"
    assert {p for p in paths if not re.match(r"/(v1/|healthz$|readyz$)", p)} == set(), paths
    assert {"/v1/jobs", "/v1/datasets", "/v1/tasks"} <= {p.rstrip("/") for p in paths}


def test_nothing_is_loaded_from_another_origin():
    for path, text in _sources().items():
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # the SVG namespace, not a fetch
        assert "@import" not in text and "url(" not in text.replace("url(data:", ""), path.name


def _js_object(name: str) -> dict:
    text = (ASSETS / "defaults.js").read_text()
    match = re.search(rf"export const {name} = (\{{.*?\}});", text, re.S)
    assert match, name
    return json.loads(match.group(1))


def test_the_new_job_form_has_the_api_defaults():
    from app.schemas_jobs import HyperparametersIn, MethodIn
    from spafit_core.config import DEFAULT_TARGETS, TARGET_ROLES

    assert _js_object("METHOD_DEFAULTS") == MethodIn().model_dump(exclude={"sweep"})
    assert _js_object("HYPERPARAMETER_DEFAULTS") == HyperparametersIn().model_dump()
    targets = _js_object("LORA_TARGETS")
    assert targets == {"all": list(TARGET_ROLES), "default": list(DEFAULT_TARGETS)}
    fields = _js_object("METHOD_FIELDS")
    assert set(fields) == set(MethodIn.model_fields["name"].annotation.__args__)
    assert {f for used in fields.values() for f in used} <= set(MethodIn.model_fields)
