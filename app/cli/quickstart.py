"""`spafit quickstart`: an embedded service in a child process, the bundled sentiment sample trained and
queried through the SDK, the equivalent HTTP calls printed."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .common import exit_on_signal, json_option, main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


QUICKSTART_TASK = "sentiment"
QUICKSTART_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # ships in a package: no download
QUICKSTART_START_TIMEOUT = 180.0  # seconds for the embedded worker to pick the job up
QUICKSTART_EXAMPLES = [
    "An absolute delight from start to finish.",
    "The battery died after two days and support never answered.",
    "Great value, it works exactly as described.",
    "A tedious plot and wooden acting; I left halfway through.",
]


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port of the service [default: a free one].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the service's database and logs here [default: a temporary folder, removed at the end].")
@click.option("--epochs", type=click.IntRange(1, 100), default=3, show_default=True, help="Training epochs.")
@click.option("--keep-running", is_flag=True, help="Leave the service up when done (until Ctrl-C).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for the service to become ready.")
@json_option
def quickstart(port: int | None, data_dir: Path | None, epochs: int, keep_running: bool, ready_timeout: float,
               as_json: bool) -> None:
    """Try SPAFIT end to end in a minute or two on a CPU, with nothing to set up.

    Starts an embedded service (`spafit serve`, auth off, SQLite) on a free port, uploads the bundled
    sentiment sample, fine-tunes a SPAFIT adapter on the packaged MiniLM, predicts a few sentences, prints
    the equivalent HTTP calls, and stops the service (unless --keep-running).
    """
    import shutil
    import tempfile

    temporary = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="spafit-quickstart-")) if data_dir is None else data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    say = functools.partial(click.echo, err=True)
    service = _Service(port, data_dir)
    # A plain `kill` (SIGTERM) must stop the child service too: turn it into an exit that runs `finally`.
    signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        say(f"starting the service at {url} (data in {data_dir}, log {service.log_path})")
        service.start()
        service.wait_ready(url, ready_timeout)
        from spafit_client import Client

        with Client(url, api_key="") as client:  # embedded: auth off
            summary = _quickstart_run(client, url, epochs, say)
        summary["data_dir"] = str(data_dir)
        summary["kept_running"] = keep_running
        if as_json:
            click.echo(json.dumps(summary, indent=2, default=str))
        else:
            click.echo(_quickstart_text(summary))
        if keep_running:
            say(f"\nthe service keeps running at {url}; Ctrl-C stops it")
            try:
                service.proc.wait()
            except KeyboardInterrupt:
                say("stopping")
    except Exception:
        temporary = False  # keep the folder: its log says what went wrong
        say(f"--- from the service's log ({service.log_path}, kept):\n{service.problems()}")
        raise
    finally:
        service.stop()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


def _quickstart_run(client: Any, url: str, epochs: int, say: Callable[[str], None]) -> dict[str, Any]:
    train_csv, val_csv = SAMPLE_DATA / "sentiment_train.csv", SAMPLE_DATA / "sentiment_validation.csv"
    train = client.datasets.upload(train_csv, name="sentiment-train")
    val = client.datasets.upload(val_csv, name="sentiment-validation")
    say(f"uploaded {train.rows} training and {val.rows} validation rows (labels: "
        f"{', '.join(sorted(train.label_counts or {}))})")
    method = {"name": "spafit"}  # n1 = L/3, n2 = 2L/3, rank 8: the defaults
    hyper = {"epochs": epochs, "batch_size": 8, "max_seq_length": 64, "seed": 42}
    job = client.jobs.create(task=QUICKSTART_TASK, train_dataset=train, validation_dataset=val,
                             base_model=QUICKSTART_MODEL, method=method, hyperparameters=hyper)
    say(f"fine-tuning job {job.id}: SPAFIT on {QUICKSTART_MODEL}, {epochs} epoch(s), batch 8")
    _wait_started(client, job.id, QUICKSTART_START_TIMEOUT)
    job = client.jobs.wait(job.id, progress=True)
    predictions = client.tasks.predict(QUICKSTART_TASK, QUICKSTART_EXAMPLES)
    task = client.tasks.get(QUICKSTART_TASK)
    version = task.active_version
    return {
        "url": url, "task": QUICKSTART_TASK, "base_model": QUICKSTART_MODEL,
        "datasets": {"train": train.id, "validation": val.id},
        "job": job.model_dump(mode="json"), "metrics": job.metrics or {},
        "adapter_version": job.adapter_version,
        "adapter": {"size_bytes": version.size_bytes, "trainable_params": version.trainable_params} if version else None,
        "predictions": [{"text": text, "label": p.label, "score": p.score}
                        for text, p in zip(QUICKSTART_EXAMPLES, predictions.predictions, strict=True)],
        "curl": _quickstart_curl(url, job.id, train.id, val.id, epochs),
    }


def _wait_started(client: Any, job_id: str, timeout: float) -> None:
    """Fail early, rather than wait forever, when no worker picks the job up."""
    import time

    deadline = time.monotonic() + timeout
    while client.jobs.get(job_id).status == "queued":
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} was not picked up within {timeout:.0f}s: the service's worker "
                                       "is not running (see the service's log above)")
        time.sleep(1.0)


def _quickstart_curl(url: str, job_id: str, train_id: str, val_id: str, epochs: int) -> list[str]:
    job_body = json.dumps({"task": QUICKSTART_TASK, "train_dataset": train_id, "validation_dataset": val_id,
                           "method": {"name": "spafit"},
                           "hyperparameters": {"epochs": epochs, "batch_size": 8, "max_seq_length": 64}})
    predict_body = json.dumps({"inputs": QUICKSTART_EXAMPLES[:1]})
    return [
        f"curl -F file=@{SAMPLE_DATA / 'sentiment_train.csv'} {url}/v1/datasets",
        f"curl -F file=@{SAMPLE_DATA / 'sentiment_validation.csv'} {url}/v1/datasets",
        f"curl -H 'Content-Type: application/json' -H 'Idempotency-Key: my-first-job' -d '{job_body}' {url}/v1/jobs",
        f"curl -N -H 'Accept: text/event-stream' {url}/v1/jobs/{job_id}/events",
        f"curl {url}/v1/jobs/{job_id}",
        f"curl -H 'Content-Type: application/json' -d '{predict_body}' {url}/v1/tasks/{QUICKSTART_TASK}/predict",
        f"curl -o {QUICKSTART_TASK}.zip {url}/v1/tasks/{QUICKSTART_TASK}/adapter",
    ]


def _quickstart_text(s: dict[str, Any]) -> str:
    metrics = "  ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items() if isinstance(v, int | float))
    adapter = s["adapter"] or {}
    lines = [
        "",
        f"Trained task {s['task']!r} (adapter v{s['adapter_version']}, "
        f"{adapter.get('trainable_params') or '?'} trainable parameters, "
        f"{adapter.get('size_bytes') or '?'} bytes) on {s['base_model']}.",
        f"Validation: {metrics or 'n/a'}",
        "",
        "Predictions:",
        *(f"  {p['label']:<10} {p['score']:.3f}  {p['text']}" for p in s["predictions"]),
        "",
        "The same with plain HTTP:",
        *(f"  {c}" for c in s["curl"]),
        "",
        "Or with the CLI (the service stays up with --keep-running):",
        f"  spafit predict {s['task']} \"some text\" --url {s['url']}",
        f"  spafit jobs show {s['job']['id']} --url {s['url']}",
    ]
    return "\n".join(lines)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Service:
    """`spafit serve` as a child process: embedded mode in its own data folder, its log in a file."""

    def __init__(self, port: int, data_dir: Path):
        self.port, self.data_dir = port, data_dir
        self.log_path = data_dir / "service.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # A clean embedded service: none of the caller's SPAFIT_* settings (a server-mode database, say).
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
        env.update(SPAFIT_MODE="embedded", SPAFIT_DATA_DIR=str(self.data_dir),
                   SPAFIT_DEFAULT_BASE_MODEL=QUICKSTART_MODEL, TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
        self._log = open(self.log_path, "ab")
        # Its own session: Ctrl-C reaches only us, and we stop it (and its worker) in order.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.data_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, timeout: float) -> None:
        """Until /readyz answers 200 (the database, the broker and the backbone are up)."""
        import time

        from spafit_client import Client, SpafitError

        deadline = time.monotonic() + timeout
        with Client(url, api_key="", max_retries=0, timeout=10) as probe:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise click.ClickException(f"the service exited with code {self.proc.returncode} before it "
                                               "was ready")
                try:
                    probe.ready()
                    return
                except SpafitError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve stops its worker on the way out
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever is left of its process group (its own session: nothing of anyone else's)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def problems(self, n: int = 30) -> str:
        """The log's error lines (its last lines if there are none): the poll requests would drown them."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        marked = [line for line in lines if any(m in line for m in ("CRITICAL", "ERROR", "Traceback"))]
        return "\n".join((marked or lines)[-n:])
