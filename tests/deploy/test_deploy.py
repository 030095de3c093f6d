"""What can be checked of the container deployment without a Docker engine: the compose file parses and
references only what exists, every container runs a `spafit` CLI command the tests also run, the image
copies only paths that exist, and the wheel carries the migrations, sample data and dashboard."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _cli_commands() -> dict[str, set[str]]:
    from app.cli import main

    out = {}
    for name, cmd in main.commands.items():
        out[name] = set(getattr(cmd, "commands", {}) or {})
    return out


def test_compose_services_and_dependencies_exist(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source in compose.get("volumes", {}), f"{name} mounts undeclared volume {source}"
        assert "healthcheck" in svc or name == "migrate", f"{name} has no healthcheck"
    # Migrations run once, before the API and the workers.
    for name in ("api", "worker", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["restart"] == "no"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_containers_run_cli_commands_that_exist(compose):
    commands = _cli_commands()
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "spafit":
            continue
        assert cmd[1] in commands, f"{name} runs unknown command spafit {cmd[1]}"
        path = cmd[1:2]
        if commands[cmd[1]]:
            assert cmd[2] in commands[cmd[1]], f"{name} runs unknown command spafit {cmd[1]} {cmd[2]}"
            path = cmd[1:3]
        out = subprocess.run([sys.executable, "-m", "app.cli", *path, "--help"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` with VAR unset (or from `env`)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: (env or {}).get(m.group(1), m.group(2)), str(value))


def test_compose_environment_names_real_settings(compose):
    from app.settings import Settings

    fields = {f"SPAFIT_{name.upper()}" for name in Settings.model_fields}
    env = compose["x-spafit-env"]
    assert set(env) <= fields, set(env) - fields
    assert env["SPAFIT_MODE"] == "server"
    s = Settings(_env_file=None, **{k[len("SPAFIT_"):].lower(): _interpolate(v) for k, v in env.items()})
    assert s.auth_enabled is True and s.database_url.startswith("postgresql+psycopg://")
    assert s.metrics_token is None and not s.metrics_on_api_port  # /metrics closed unless a token is given
    s = Settings(_env_file=None, **{k[len("SPAFIT_"):].lower(): _interpolate(v, {"SPAFIT_METRICS_TOKEN": "t" * 32})
                                    for k, v in env.items()})
    assert s.metrics_on_api_port


def test_compose_publishes_only_the_api_and_only_on_loopback_by_default(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert list(published) == ["api"], published  # Postgres and Redis are reachable only inside the network
    (port,) = published["api"]
    assert _interpolate(port) == "127.0.0.1:8000:8000"
    assert _interpolate(port, {"SPAFIT_PUBLISH": "0.0.0.0:8000"}) == "0.0.0.0:8000:8000"


def test_the_image_runs_server_mode():
    """`docker run spafit` must not come up auth-off on 0.0.0.0: the image sets server mode, which refuses to
    start without a database and a broker, and `serve` refuses a non-loopback host with auth off anyway."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s+SPAFIT_MODE=server\b", text, re.M)
    assert 'CMD ["spafit", "serve", "--host", "0.0.0.0"' in text and "--insecure-bind" not in text


def test_dockerfile_copies_what_exists_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        m = re.match(r"COPY (?!--from)(.+) \S+$", line.strip())
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"^USER spafit$", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu' in text
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" "torch==\$\{TORCH_VERSION\}"', text)
    cmd = re.search(r'^CMD \["spafit", "(\w+)"', text, re.M).group(1)
    assert cmd in _cli_commands()


def test_healthcheck_paths_are_routes(compose):
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(_env_file=None, preload_base_model=False))
    paths = set(app.openapi()["paths"])
    for url in re.findall(r"127\.0\.0\.1:8000(/\w+)", (ROOT / "docker-compose.yml").read_text()
                          + (ROOT / "Dockerfile").read_text()):
        assert url in paths


@pytest.mark.slow
def test_wheel_carries_migrations_sample_data_and_static_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("spafit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "migrations/versions/0001_initial.py" in names
    assert "migrations/env.py" in names and "migrations/script.py.mako" in names
    assert {"app/sample_data/sentiment_train.csv", "app/sample_data/sentiment_validation.csv"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert any(n.startswith("app/static/") for n in names) or not (ROOT / "app/static").exists()
