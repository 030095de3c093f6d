"""`spafit`: one command-line entry point for running, administering and using the service.

Run it: `serve`, `worker`; administer it: `db upgrade`, `keys`; try it: `quickstart`; train without a
service: `train`; use a service (through the SDK, `spafit_client`): `predict`, `jobs`, `tasks`. Remote
commands take `--url` ($SPAFIT_URL, default http://127.0.0.1:8000) and `--api-key` ($SPAFIT_API_KEY).
Every command but `serve` and `worker` takes `--json`: the result as JSON on stdout, and an error as
`{"error": {...}}` on stderr.

Exit codes scripts can rely on: 0 success, 1 the operation failed (e.g. a job failed), 2 usage error,
3 not found, 4 auth/permission error, 5 service unreachable, 6 validation error (4xx from the API),
7 timed out, 130 interrupted.

Heavy modules (torch, the app, the SDK) are imported inside the commands that use them, so `--help`
is instant and needs no torch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from spafit_core import __version__

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_INVALID, EXIT_TIMEOUT = 1, 2, 3, 4, 5, 6, 7
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8000"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
_JSON_META = "spafit.json"  # ctx.meta flag: the running command was given --json


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an error from the SDK or the core; None for anything else (a bug: let it show).
    The one place errors become exit codes."""
    sdk = sys.modules.get("spafit_client.errors")
    if sdk is not None and isinstance(exc, sdk.SpafitError):
        if isinstance(exc, sdk.WaitTimeout | sdk.APITimeoutError):
            return EXIT_TIMEOUT
        if isinstance(exc, sdk.APIConnectionError):
            return EXIT_UNREACHABLE
        if isinstance(exc, sdk.JobFailed | sdk.JobCancelled):
            return EXIT_FAILED
        if isinstance(exc, sdk.SpafitAPIError):
            return _exit_code_for_status(exc.status)
        return EXIT_FAILED
    core = sys.modules.get("spafit_core.errors")
    if core is not None and isinstance(exc, core.SpafitError):
        return _exit_code_for_status(exc.status)
    return None


def _exit_code_for_status(status: int) -> int:
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_AUTH
    if 400 <= status < 500:
        return EXIT_INVALID
    return EXIT_FAILED


def _error_payload(exc: BaseException, code: int) -> dict[str, Any]:
    out: dict[str, Any] = {"message": str(exc), "exit_code": code, "kind": type(exc).__name__}
    for name in ("status", "type", "title", "detail", "field", "errors", "error_type"):
        value = getattr(exc, name, None)
        if value is not None and not callable(value):
            out[name] = value if isinstance(value, str | int | list | dict) else str(value)
    return out


class SpafitGroup(click.Group):
    """Turns SDK / core errors into their exit codes (see `exit_code_for`) and Ctrl-C into 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except Exception as e:
            code = exit_code_for(e)
            if code is None:
                raise
            if ctx.meta.get(_JSON_META):
                click.echo(json.dumps({"error": _error_payload(e, code)}, default=str), err=True)
            else:
                click.echo(f"error: {e}", err=True)
            ctx.exit(code)


@click.group(cls=SpafitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="spafit")
def main() -> None:
    """Fine-tune SPAFIT adapters and serve every task from one frozen backbone.

    Run the service with `serve` (embedded: API + worker, no setup) or `serve` + `worker` on separate
    machines; try it with `quickstart`; train locally with `train`; use a service with `predict`, `jobs`,
    `tasks`, `sweep`; administer with `keys`, `db`. Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 auth,
    5 unreachable, 6 invalid, 7 timeout, 130 interrupted.
    """


# ------------------------------------------------------------------------------------------ options
def _mark_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON_META] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_mark_json, expose_value=True,
                           help="Machine-readable output (JSON on stdout; errors as JSON on stderr).")


def remote(f: Callable[..., Any]) -> Callable[..., Any]:
    """A command that talks to a service: adds --url / --api-key / --http-timeout / --json and passes `client`."""

    @click.option("--url", envvar="SPAFIT_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
                  help="The service [env: SPAFIT_URL].")
    @click.option("--api-key", envvar="SPAFIT_API_KEY", default=None, metavar="KEY",
                  help="API key [env: SPAFIT_API_KEY]; an embedded service needs none.")
    @click.option("--http-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
                  help="Seconds to wait for each answer of the service.")
    @json_option
    @functools.wraps(f)
    def wrapper(url: str, api_key: str | None, http_timeout: float, **kwargs: Any) -> Any:
        from spafit_client import Client

        with Client(url, api_key=api_key or "", timeout=http_timeout) as client:
            return f(client=client, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ running
@main.command()
@click.option("--queues", default="training,light", show_default=True, help="Celery queues to consume.")
@click.option("--concurrency", default=1, show_default=True, type=int,
              help="Training processes; use one per GPU.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, concurrency: int, loglevel: str) -> None:
    """Run a Celery worker. Each training job runs in a fresh child process (CUDA is never initialised in
    a parent that forks), one job per process at a time."""
    from worker.celery_app import celery_app

    celery_app.worker_main([
        "worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
        "--max-tasks-per-child", "1", "--prefetch-multiplier", "1", "--loglevel", loglevel,
        # spafit@<host>: what the compose health check pings (`celery inspect ping -d spafit@$HOSTNAME`).
        "--without-gossip", "--without-mingle", "--hostname", os.environ.get("SPAFIT_WORKER_NAME", "spafit@%h"),
    ])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--worker/--no-worker", "with_worker", default=None,
              help="Also run a worker process (default: yes in embedded mode, no in server mode).")
@click.option("--workers", "api_workers", default=1, show_default=True, type=int, help="API processes (uvicorn).")
@click.option("--insecure-bind", is_flag=True,
              help="With auth off (embedded mode), bind a non-loopback --host anyway: everyone who reaches the "
              "port acts as the local tenant. Also SPAFIT_INSECURE_BIND=true.")
def serve(host: str, port: int, with_worker: bool | None, api_workers: int, insecure_bind: bool) -> None:
    """Run the HTTP API. In embedded mode (no settings at all) it also starts a worker, so one command
    gives a working service on SQLite and a local broker. With auth off it binds only loopback addresses
    unless told otherwise (--insecure-bind)."""
    import uvicorn

    from app.main import _configure_logging, log
    from app.security import is_loopback
    from app.settings import LOOPBACK_HOSTS, get_settings

    settings = get_settings()
    _configure_logging(settings.log_level)
    if not settings.auth_enabled and not is_loopback(host):
        if not (insecure_bind or settings.insecure_bind):
            raise click.UsageError(
                f"auth is off (embedded mode), so --host {host} would let anyone who reaches port {port} act as "
                "the local tenant. Bind 127.0.0.1, run server mode (SPAFIT_MODE=server: API keys), or pass "
                "--insecure-bind to accept that.")
        log.warning(
            "INSECURE BIND: auth is off and the API listens on %s:%s; anyone who reaches it acts as the local "
            "tenant (--insecure-bind)", host, port)
        os.environ["SPAFIT_INSECURE_BIND"] = "true"  # for the app, which refuses network requests otherwise
        get_settings.cache_clear()
    if not is_loopback(host) and sorted(settings.allowed_hosts) == sorted(LOOPBACK_HOSTS):
        log.warning("only the loopback Host names are answered (SPAFIT_ALLOWED_HOSTS); add the name clients use")
    if with_worker is None:
        with_worker = settings.mode == "embedded"
    child = None
    if with_worker:
        if settings.auto_migrate:  # migrate once before both processes start, not concurrently in each
            from app.services import migrate

            migrate.upgrade(settings.database_url)
        child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING"])
        click.echo(f"started worker process {child.pid}", err=True)
        # uvicorn re-raises the SIGTERM it shut down on once it is done; with the default action that would
        # end this process before `finally` could stop the worker, leaving it orphaned.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=api_workers,
                    log_level="info")
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def _exit_on_signal(signum: int, _frame: Any) -> None:
    sys.exit(128 + signum)


# ------------------------------------------------------------------------------------------ quickstart
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
    signal.signal(signal.SIGTERM, _exit_on_signal)
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


# ------------------------------------------------------------------------------------------ train
class _LayerIndex(click.ParamType):
    """An int (a layer index) or a float (a fraction of the depth L), as in the method config."""

    name = "INDEX|FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, int | float):
            return value
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                self.fail(f"{value!r} is neither a layer index (int) nor a fraction of L (float)", param, ctx)


@main.command()
@click.argument("data")
@click.option("--validation", "validation", default=None, metavar="FILE", help="Validation data, evaluated each epoch.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Adapter folder to write [default: <data name>-adapter].")
@click.option("--base-model", default=None, help="Backbone: hub id, local folder [default: the packaged MiniLM].")
@click.option("--method", "method_name", type=click.Choice(["spafit", "lora", "bitfit"]), default="spafit",
              show_default=True)
@click.option("--n1", type=_LayerIndex(), default=None, help="First bias-only layer: index or fraction of L [default: L/3].")
@click.option("--n2", type=_LayerIndex(), default=None, help="First LoRA layer: index or fraction of L [default: 2L/3].")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha (the update is scaled by alpha / rank).")
@click.option("--epochs", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Learning rate [default: 1e-3 for adapters].")
@click.option("--max-seq-length", type=click.IntRange(8, 8192), default=128, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--text-field", "text_fields", multiple=True, help="Text column (twice for sentence pairs) [default: inferred].")
@click.option("--label-field", default=None, help="Label column [default: inferred].")
@click.option("--task-type", type=click.Choice(["single_label_classification", "multi_label_classification",
                                                 "regression"]), default=None, help="[default: inferred]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@json_option
def train(data: str, validation: str | None, out: Path | None, base_model: str | None, method_name: str,
          n1: int | float | None, n2: int | float | None, rank: int, alpha: float, epochs: int, batch_size: int,
          learning_rate: float | None, max_seq_length: int, seed: int, text_fields: tuple[str, ...],
          label_field: str | None, task_type: str | None, device: str, progress: bool, as_json: bool) -> None:
    """Fine-tune an adapter here, without a service: DATA (CSV, TSV, JSONL, glue/<task>, hf:<id>) in, an
    adapter folder (spafit_adapter.json + adapter.safetensors) out. Import it into a service with
    `spafit tasks import TASK FOLDER`."""
    for spec, name in ((data, "DATA"), (validation, "--validation")):
        if spec is not None and not spec.lower().startswith(("glue/", "hf:")) and not Path(spec).exists():
            raise click.BadParameter(f"{spec!r} does not exist", param_hint=name)
    from spafit_core import DEFAULT_BASE_MODEL, MethodConfig, TrainConfig, finetune

    out = out or Path(f"{Path(data.replace(':', '-')).stem.replace('/', '-')}-adapter")
    method = MethodConfig(name=method_name, n1=n1, n2=n2, rank=rank, alpha=alpha)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                      max_seq_length=max_seq_length, seed=seed, device=device, log_every_steps=1)
    base_model = base_model or DEFAULT_BASE_MODEL
    view = _TrainProgress() if progress else None
    try:
        result = finetune(data, validation, base_model=base_model, method=method, train_config=cfg,
                          text_fields=list(text_fields) or None, label_field=label_field, task_type=task_type,
                          callback=view)
    finally:
        if view is not None:
            view.close()
    result.save(out)
    r = result.train_result
    summary = {
        "out": str(out.resolve()), "base_model": base_model, "method": method.to_dict(),
        "task": result.model.task.to_dict(), "metrics": result.metrics, "main_metric": r.main_metric,
        "best_epoch": r.best_epoch, "history": r.history, "steps": r.steps,
        "train_seconds": round(r.train_seconds, 3), "param_counts": result.model.param_counts(),
        "files": sorted(p.name for p in out.iterdir()),
    }
    _emit(summary, as_json, _train_text(summary))


@main.command("export")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), default="peft", show_default=True,
              help="peft: a PEFT LoRA folder for PeftModel.from_pretrained on the stock classifier; merged: a "
                   "standalone transformers model folder with every delta folded in.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The folder to write.")
@click.option("--base-model", default=None, help="Where the base weights are [default: the adapter's base model].")
@json_option
def export(adapter: Path, fmt: str, out: Path, base_model: str | None, as_json: bool) -> None:
    """Write ADAPTER (a folder from `spafit train`, or an unzipped download) in another format."""
    from spafit_core.adapter import load_adapter
    from spafit_core.peft_interop import to_peft

    model = load_adapter(adapter, base_model=base_model)
    if fmt == "merged":
        model.save_merged(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in to_peft(model).items():
            (out / name).write_bytes(data)
    summary = {"out": str(out.resolve()), "format": fmt, "files": sorted(p.name for p in out.iterdir())}
    hint = ("load it with peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
            f"{model.base_model_name!r}, num_labels={model.task.num_labels}), {str(out)!r})" if fmt == "peft" else
            f"load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    _emit(summary, as_json, f"wrote {out} ({fmt}); {hint}")


@main.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="peft: a PEFT LoRA folder (or its zip) trained on the stock sequence classifier.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The SPAFIT adapter folder to write.")
@click.option("--base-model", default=None,
              help="Base model [default: the PEFT config's base_model_name_or_path].")
@click.option("--label", "labels", multiple=True,
              help="Label names in head order (repeat) [default: from a SPAFIT export, else LABEL_0..].")
@json_option
def import_(source: Path, fmt: str, out: Path, base_model: str | None, labels: tuple[str, ...],
            as_json: bool) -> None:
    """Turn SOURCE, an adapter trained elsewhere, into a SPAFIT adapter folder; `spafit tasks import TASK OUT`
    then serves it."""
    from spafit_core.adapter import CONFIG_FILE, WEIGHTS_FILE
    from spafit_core.errors import AdapterError
    from spafit_core.peft_interop import (
        from_peft,
        read_peft_files,
        read_peft_folder,
        serialize_imported,
        unpack_peft,
    )

    files = read_peft_folder(source) if source.is_dir() else unpack_peft(source.read_bytes())
    if base_model is None:
        base_model = read_peft_files(files)[0].get("base_model_name_or_path")
        if not base_model or not isinstance(base_model, str):
            raise AdapterError("the PEFT config names no base model: give --base-model", field="base_model")
    model = from_peft(files, base_model, labels=list(labels) or None)
    cfg, weights = serialize_imported(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(weights)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    summary = {"out": str(out.resolve()), "base_model": cfg["base_model"]["name"], "method": cfg["method"],
               "task": cfg["task"], "param_counts": cfg["param_counts"],
               "files": sorted(p.name for p in out.iterdir())}
    _emit(summary, as_json, f"wrote {out}: {cfg['method']['name']} n1={cfg['stratification']['n1']} "
                            f"n2={cfg['stratification']['n2']} rank={cfg['method']['rank']}, labels "
                            f"{cfg['task']['labels']}; serve it with `spafit tasks import TASK {out}`")


class _TrainProgress:
    """The training loop's events as a progress bar (the SDK's, so local and remote runs look alike)."""

    def __init__(self) -> None:
        from spafit_client.models import JobEvent
        from spafit_client.progress import JobProgress

        self._event, self._view, self._seq = JobEvent, JobProgress(desc="training"), 0

    def __call__(self, event: dict[str, Any]) -> None:
        self._seq += 1
        data = {k: v for k, v in event.items() if k != "type"}
        self._view(self._event(seq=self._seq, type=str(event.get("type")), data=data))

    def close(self) -> None:
        self._view.close()


def _train_text(s: dict[str, Any]) -> str:
    names = sorted({k for h in s["history"] for k in (h.get("metrics") or {})})
    rows = [[str(h["epoch"]), f"{h['loss']:.4f}", *(_num((h.get("metrics") or {}).get(n)) for n in names),
             "*" if h["epoch"] == s["best_epoch"] else ""] for h in s["history"]]
    counts = s["param_counts"]
    return "\n".join([
        _table(["epoch", "loss", *names, "best"], rows),
        "",
        f"trainable parameters: {counts.get('total')} ({counts.get('without_head')} without the head, "
        f"{100 * (counts.get('trainable_fraction') or 0):.3f}% of the model)" if "trainable_fraction" in counts
        else f"trainable parameters: {counts.get('total')} ({counts.get('without_head')} without the head)",
        f"steps: {s['steps']} in {s['train_seconds']:.1f}s",
        f"adapter: {s['out']} ({', '.join(s['files'])})",
    ])


# ------------------------------------------------------------------------------------------ predict
PREDICT_CHUNK = 32  # inputs per request: under the service's default limit of 64
EVENTS_PAGE = 1000


@main.command()
@click.argument("args", nargs=-1, metavar="[TASK] [TEXT]...")
@click.option("--file", "file", type=click.File("r"), default=None,
              help="Inputs, one per line: plain text, or JSON Lines (a string or {text, text_pair}); - for stdin.")
@click.option("--tasks", default=None, metavar="A,B,...",
              help="Ask several tasks at once (fan-out); then every argument is a text.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Class scores per input [default: all].")
@remote
def predict(client: Any, args: tuple[str, ...], file: Any, tasks: str | None, top_k: int | None,
            as_json: bool) -> None:
    """Predict with a service: `spafit predict TASK "text" ...`, `spafit predict TASK --file inputs.jsonl`,
    or `spafit predict --tasks a,b "text"` for several tasks at once."""
    task_names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if task_names is None:
        if not args:
            raise click.UsageError("name a TASK (or --tasks a,b)")
        task, texts = args[0], list(args[1:])
    else:
        task, texts = None, list(args)
    inputs: list[Any] = [*texts, *(_read_inputs(file) if file is not None else [])]
    if not inputs:
        raise click.UsageError("give texts as arguments or --file")
    chunks = [inputs[i: i + PREDICT_CHUNK] for i in range(0, len(inputs), PREDICT_CHUNK)]
    if task_names is None:
        answers = [client.tasks.predict(task, chunk, top_k=top_k) for chunk in chunks]
        merged = {"task": task, "version": answers[0].version,
                  "predictions": [p.model_dump(mode="json") for a in answers for p in a.predictions]}
        rows = [[p["label"] if p["label"] is not None else "", _num(p["score"]), _text(x)]
                for x, p in zip(inputs, merged["predictions"], strict=True)]
        _emit(merged, as_json, _table(["label", "score", "input"], rows))
        return
    answers = [client.predict_many(task_names, chunk, top_k=top_k) for chunk in chunks]
    results = []
    for i, name in enumerate(task_names):
        parts = [a.results[i] for a in answers]
        results.append({"task": name, "version": parts[0].version,
                        "predictions": [p.model_dump(mode="json") for part in parts for p in part.predictions]})
    rows = [[_text(x), *(f"{r['predictions'][j]['label']} ({r['predictions'][j]['score']:.3f})" for r in results)]
            for j, x in enumerate(inputs)]
    _emit({"results": results}, as_json, _table(["input", *task_names], rows))


def _read_inputs(file: Any) -> list[Any]:
    out: list[Any] = []
    for n, line in enumerate(file, 1):
        line = line.strip()
        if not line:
            continue
        if line[0] in "{\"":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise click.BadParameter(f"line {n} is not valid JSON: {e}", param_hint="--file") from None
            if isinstance(value, dict) and "text" not in value:
                raise click.BadParameter(f"line {n}: an object needs `text` (and optionally `text_pair`)",
                                         param_hint="--file")
            out.append(value)
        else:
            out.append(line)
    return out


# ------------------------------------------------------------------------------------------ datasets
@main.group(cls=SpafitGroup)
def datasets() -> None:
    """Datasets on a service: import from the Hugging Face Hub, list, show."""


def _dataset_text(d: Any) -> str:
    lines = [f"dataset {d.id}  {d.name}  [{d.state}]"]
    if d.error is not None:
        lines.append(f"error: {d.error.type}: {d.error.message}")
    if d.state == "ready":
        lines.append(f"rows: {d.rows}  columns: {', '.join(d.columns)}  text: {', '.join(d.text_fields)}  "
                     f"label: {d.label_field}")
        if d.label_counts:
            lines.append("labels: " + ", ".join(f"{k}={v}" for k, v in d.label_counts.items()))
    return "\n".join(lines)


@datasets.command("import")
@click.argument("name")
@click.option("--split", default="train", show_default=True)
@click.option("--config", "config_name", default=None, help="The dataset's configuration (e.g. sst2 for glue).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Import only the first rows.")
@click.option("--name", "dataset_name", default=None, help="Name of the dataset on the service.")
@click.option("--text-fields", default=None, help="Text column(s), comma-separated (default: inferred).")
@click.option("--label-field", default=None, help="Label column (default: inferred).")
@click.option("--task-type", type=click.Choice(["single_label_classification", "multi_label_classification",
                                                "regression"]), default=None)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the import is ready (or failed); --no-wait prints the importing dataset.")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Give up waiting after this many seconds (exit 7; the import goes on).")
@remote
def datasets_import(client: Any, name: str, split: str, config_name: str | None, max_rows: int | None,
                    dataset_name: str | None, text_fields: str | None, label_field: str | None,
                    task_type: str | None, wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Import a split of the Hugging Face Hub dataset NAME (`name` or `owner/name`). The service's worker
    reads it, within the service's row and byte limits."""
    fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields else None
    d = client.datasets.import_hf(name, split=split, config_name=config_name, max_rows=max_rows,
                                  dataset_name=dataset_name, text_fields=fields, label_field=label_field,
                                  task_type=task_type, wait=wait, timeout=wait_timeout)
    _emit(d.model_dump(mode="json"), as_json, _dataset_text(d))


@datasets.command("show")
@click.argument("dataset_id")
@remote
def datasets_show(client: Any, dataset_id: str, as_json: bool) -> None:
    """A dataset: state, shape, fields, label counts (or why its import failed)."""
    d = client.datasets.get(dataset_id)
    _emit(d.model_dump(mode="json"), as_json, _dataset_text(d))


@datasets.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="At most this many (0: all).")
@remote
def datasets_list(client: Any, limit: int, as_json: bool) -> None:
    """Datasets, newest first."""
    items = _take(client.datasets.list(limit=min(limit, 100) or 100), limit)
    rows = [[d.id, d.name, d.state, "" if d.rows is None else str(d.rows), d.created_at.strftime("%Y-%m-%d %H:%M:%S")]
            for d in items]
    _emit([d.model_dump(mode="json") for d in items], as_json,
          _table(["id", "name", "state", "rows", "created"], rows) if rows else "no datasets")


# ------------------------------------------------------------------------------------------ jobs
@main.group(cls=SpafitGroup)
def jobs() -> None:
    """Fine-tuning jobs on a service: list, show, wait, cancel, events."""


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]), default=None)
@click.option("--task", default=None, help="Only this task's jobs.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="At most this many (0: all).")
@remote
def jobs_list(client: Any, status: str | None, task: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    items = _take(client.jobs.list(status=status, task=task, limit=min(limit, 100) or 100), limit)
    rows = [[j.id, j.task, j.status, _progress(j), j.created_at.strftime("%Y-%m-%d %H:%M:%S")] for j in items]
    _emit([j.model_dump(mode="json") for j in items], as_json,
          _table(["id", "task", "status", "progress", "created"], rows) if rows else "no jobs")


@jobs.command("show")
@click.argument("job_id")
@remote
def jobs_show(client: Any, job_id: str, as_json: bool) -> None:
    """A job: status, progress, metrics, error, adapter version."""
    job = client.jobs.get(job_id)
    _emit(job.model_dump(mode="json"), as_json, _job_text(job))


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=None,
              help="Give up after this many seconds (exit 7; the job goes on).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@remote
def jobs_wait(client: Any, job_id: str, wait_timeout: float | None, progress: bool, as_json: bool) -> None:
    """Follow a job's live events until it ends. Exit 0 if it succeeded, 1 if it failed or was cancelled,
    7 on --timeout."""
    from spafit_client import JobCancelled, JobFailed

    try:
        job = client.jobs.wait(job_id, progress=progress, timeout=wait_timeout)
    except (JobFailed, JobCancelled) as e:
        _emit(e.job.model_dump(mode="json"), as_json, _job_text(e.job))
        raise
    _emit(job.model_dump(mode="json"), as_json, _job_text(job))


@jobs.command("cancel")
@click.argument("job_id")
@remote
def jobs_cancel(client: Any, job_id: str, as_json: bool) -> None:
    """Cancel a queued job now, or a running one at its next step."""
    job = client.jobs.cancel(job_id)
    _emit(job.model_dump(mode="json"), as_json,
          f"job {job.id}: {job.status}{' (cancel requested)' if job.cancel_requested and not job.done else ''}")


@jobs.command("delete")
@click.argument("job_id")
@remote
def jobs_delete(client: Any, job_id: str, as_json: bool) -> None:
    """Delete a finished job and its events (its adapter version stays); then its datasets can be deleted."""
    client.jobs.delete(job_id)
    _emit({"deleted": job_id}, as_json, f"job {job_id}: deleted")


@jobs.command("events")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Stream live until the job ends (JSON Lines with --json).")
@click.option("--after", type=click.IntRange(min=0), default=0, show_default=True, help="Only events after this seq.")
@remote
def jobs_events(client: Any, job_id: str, follow: bool, after: int, as_json: bool) -> None:
    """A job's events in order: status, progress, eval, checkpoint, ..."""
    if not follow:
        events: list[Any] = []
        while True:  # the service answers at most EVENTS_PAGE events at a time
            batch = client.jobs.events(job_id, after=events[-1].seq if events else after, limit=EVENTS_PAGE)
            events += batch
            if len(batch) < EVENTS_PAGE:
                break
        _emit([e.model_dump(mode="json") for e in events], as_json,
              "\n".join(_event_text(e) for e in events) or "no events")
        return
    for event in client.jobs.stream_events(job_id, after=after):
        click.echo(json.dumps(event.model_dump(mode="json")) if as_json else _event_text(event))


# ------------------------------------------------------------------------------------------ sweep
def _int_list(value: str | None) -> list[Any] | None:
    if not value:
        return None
    return [float(v) if "." in v else int(v) for v in value.split(",") if v.strip()]


@main.command()
@click.argument("train")
@click.option("--task", required=True, help="The task the best adapter is registered under.")
@click.option("--validation", default=None, metavar="FILE_OR_ID",
              help="Validation data the trials are compared on (a file to upload, or a dataset id).")
@click.option("--n1", "n1s", default=None, metavar="A,B,...", help="Values of n1 (index, or fraction of L).")
@click.option("--n2", "n2s", default=None, metavar="A,B,...", help="Values of n2 (index, or fraction of L).")
@click.option("--rank", "ranks", default=None, metavar="A,B,...", help="Values of the LoRA rank.")
@click.option("--max-trials", type=click.IntRange(1, 64), default=16, show_default=True)
@click.option("--max-trainable-params", type=click.IntRange(min=1), default=None,
              help="Only trials under this trainable-parameter budget can win.")
@click.option("--epochs", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--wait/--no-wait", default=True, help="Follow the sweep and print its leaderboard.")
@remote
def sweep(client: Any, train: str, task: str, validation: str | None, n1s: str | None, n2s: str | None,
          ranks: str | None, max_trials: int, max_trainable_params: int | None, epochs: int, batch_size: int,
          wait: bool, as_json: bool) -> None:
    """Search SPAFIT's stratification: train every combination of the given n1 / n2 / rank values as a trial
    job (in parallel across workers) and register the best by validation metric.

    TRAIN is a CSV/TSV/JSONL file to upload, or the id of a dataset already on the service.
    Example: spafit sweep train.csv --validation val.csv --task sentiment --n1 0,1,2 --n2 3,4 --rank 4,8
    """
    from spafit_client import JobCancelled, JobFailed

    def dataset(ref: str) -> str:
        return client.datasets.upload(ref).id if Path(ref).is_file() else ref

    spec = {"n1": _int_list(n1s), "n2": _int_list(n2s), "rank": _int_list(ranks), "max_trials": max_trials,
            "max_trainable_params": max_trainable_params}
    job = client.jobs.create(task=task, train_dataset=dataset(train),
                             validation_dataset=dataset(validation) if validation else None,
                             method={"name": "spafit", "sweep": {k: v for k, v in spec.items() if v is not None}},
                             hyperparameters={"epochs": epochs, "batch_size": batch_size})
    if not wait:
        _emit(job.model_dump(mode="json"), as_json, f"sweep job {job.id}: {job.progress.total_steps} trials queued"
              if job.progress else f"sweep job {job.id}")
        return
    failed: Exception | None = None
    try:
        job = client.jobs.wait(job.id, progress=not as_json)
    except (JobFailed, JobCancelled) as e:
        job, failed = e.job, e
    events = client.jobs.events(job.id, limit=EVENTS_PAGE)
    trials = [e.data for e in events if e.type == "trial"]
    final = next((e.data for e in reversed(events) if e.type == "status"), {})
    rows = [[str(t.get("n1")), str(t.get("n2")), str(t.get("rank")), t.get("status", ""),
             _metric(t.get("metrics")), str(t.get("trainable_params", "-"))] for t in trials]
    text = _table(["n1", "n2", "rank", "status", "metric", "trainable"], rows) if rows else "no trials"
    if final.get("best"):
        b = final["best"]
        text += (f"\nbest: n1={b.get('n1')} n2={b.get('n2')} rank={b.get('rank')} "
                 f"({final.get('metric')}={final.get('value')}), registered as {task} v{final.get('adapter_version')}")
    _emit({"job": job.model_dump(mode="json"), "trials": trials, "result": final}, as_json, text)
    if failed is not None:
        raise failed


# ------------------------------------------------------------------------------------------ tasks
@main.group(cls=SpafitGroup)
def tasks() -> None:
    """Tasks and their adapter versions on a service: list, show, versions, activate, export, import."""


@tasks.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True, help="At most this many (0: all).")
@remote
def tasks_list(client: Any, limit: int, as_json: bool) -> None:
    """Tasks, newest first, with the version each serves."""
    items = _take(client.tasks.list(limit=min(limit, 100) or 100), limit)
    rows = [[t.name, str(t.active_version.version) if t.active_version else "-", str(t.version_count),
             _metric(t.active_version.metrics if t.active_version else None), t.updated_at.strftime("%Y-%m-%d %H:%M:%S")]
            for t in items]
    _emit([t.model_dump(mode="json") for t in items], as_json,
          _table(["task", "active", "versions", "metric", "updated"], rows) if rows else "no tasks")


@tasks.command("show")
@click.argument("task")
@remote
def tasks_show(client: Any, task: str, as_json: bool) -> None:
    """A task and its active version."""
    t = client.tasks.get(task)
    v = t.active_version
    text = f"task {t.name}: {t.version_count} version(s), active: " + (
        f"v{v.version} ({v.method.get('name')}, {v.task_type}, labels {', '.join(v.labels) or '-'}, "
        f"{v.trainable_params} trainable params, base {v.base_model}, {_metric(v.metrics)})" if v else "none")
    _emit(t.model_dump(mode="json"), as_json, text)


@tasks.command("versions")
@click.argument("task")
@remote
def tasks_versions(client: Any, task: str, as_json: bool) -> None:
    """A task's versions, newest first."""
    items = list(client.tasks.versions(task, limit=100))
    rows = [["*" if v.active else "", str(v.version), v.method.get("name", ""), _metric(v.metrics),
             str(v.size_bytes), v.job_id or "(imported)", v.created_at.strftime("%Y-%m-%d %H:%M:%S")] for v in items]
    _emit([v.model_dump(mode="json") for v in items], as_json,
          _table(["active", "version", "method", "metric", "bytes", "job", "created"], rows))


@tasks.command("activate")
@click.argument("task")
@click.argument("version", type=click.IntRange(min=1))
@remote
def tasks_activate(client: Any, task: str, version: int, as_json: bool) -> None:
    """Serve VERSION of TASK from now on (roll back or forward)."""
    t = client.tasks.activate(task, version)
    _emit(t.model_dump(mode="json"), as_json, f"task {t.name} now serves v{t.active_version.version}")


@tasks.command("export")
@click.argument("task")
@click.option("--version", type=click.IntRange(min=1), default=None, help="[default: the active version]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="A .zip path or a folder [default: <task>-v<N>.zip here].")
@click.option("--format", "fmt", type=click.Choice(["spafit", "peft"]), default="spafit", show_default=True,
              help="peft: a zipped PEFT LoRA folder for peft.PeftModel.from_pretrained.")
@remote
def tasks_export(client: Any, task: str, version: int | None, out: Path | None, fmt: str, as_json: bool) -> None:
    """Download a version as a zip (spafit_adapter.json + adapter.safetensors, or a PEFT folder)."""
    path = client.tasks.download(task, out, version=version, format=None if fmt == "spafit" else fmt)
    _emit({"task": task, "path": str(path.resolve()), "size_bytes": path.stat().st_size}, as_json, f"wrote {path}")


@tasks.command("import")
@click.argument("task")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@remote
def tasks_import(client: Any, task: str, source: Path, as_json: bool) -> None:
    """Register SOURCE (a zip, or an adapter folder from `spafit train`) as TASK's new, active version."""
    v = client.tasks.import_adapter(task, source)
    _emit(v.model_dump(mode="json"), as_json, f"task {task}: imported v{v.version} (active)")


# ------------------------------------------------------------------------------------------ admin
@main.group(cls=SpafitGroup)
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@json_option
def db_upgrade(revision: str, as_json: bool) -> None:
    """Apply migrations up to REVISION (run once per deploy, before the API starts)."""
    from app.services import migrate
    from app.settings import get_settings

    url = get_settings().database_url
    migrate.upgrade(url, revision)
    current = migrate.current(url)
    _emit({"revision": current}, as_json, f"database at {current}")


@db.command("gc")
@json_option
def db_gc(as_json: bool) -> None:
    """Free what nothing needs: checkpoints of finished jobs, blobs no row references (older than
    SPAFIT_GC_BLOB_GRACE_S), events of jobs finished over SPAFIT_EVENT_RETENTION_DAYS ago. The API also runs
    this every SPAFIT_GC_INTERVAL_S; running it by hand at the same time is safe."""
    from app.services import retention
    from app.settings import get_settings

    database = _db()
    try:
        report = retention.collect(database, get_settings())
    finally:
        database.dispose()
    _emit(report.to_dict(), as_json, f"gc: {report}")


@main.group(cls=SpafitGroup)
def keys() -> None:
    """API keys (stored hashed; the plaintext is shown once, at creation)."""


def _db():
    from app.db import Database
    from app.settings import get_settings

    return Database.from_settings(get_settings())


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name (created if new).")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["admin", "train", "predict"]),
              default=("train", "predict"), show_default=True)
@json_option
def keys_create(tenant: str, name: str, scopes: tuple[str, ...], as_json: bool) -> None:
    """Create a key for TENANT and print it (once)."""
    from app.errors import NotFound
    from app.services import keys as key_service

    with _db().session() as s:
        try:
            t = key_service.get_tenant(s, tenant)
        except NotFound:
            t = key_service.create_tenant(s, tenant)
        row, plaintext = key_service.create_key(s, t.id, name, list(scopes))
        out = {"key": plaintext, "id": str(row.id), "tenant": tenant, "tenant_id": str(t.id),
               "scopes": list(row.scopes), "prefix": row.prefix}
    _emit(out, as_json, f"{plaintext}\n(tenant {tenant}, scopes {', '.join(out['scopes'])}; store it now: "
                        "it is not shown again)")


@keys.command("list")
@click.option("--tenant", required=True)
@json_option
def keys_list(tenant: str, as_json: bool) -> None:
    """List a tenant's keys (prefixes only)."""
    from app.errors import NotFound
    from app.services import keys as key_service

    with _db().session() as s:
        try:
            t = key_service.get_tenant(s, tenant)
        except NotFound as e:
            _fail(e.message, EXIT_NOT_FOUND)
        rows = [{"id": str(k.id), "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
                 "created_at": k.created_at.isoformat(),
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                for k in key_service.list_keys(s, t.id)]
    _emit(rows, as_json, "\n".join(f"{r['prefix']}  {r['name']:<16} {','.join(r['scopes']):<20} "
                                   f"{'revoked' if r['revoked_at'] else 'active'}" for r in rows) or "no keys")


@keys.command("revoke")
@click.argument("key_id_or_prefix")
@click.option("--tenant", required=True)
@json_option
def keys_revoke(key_id_or_prefix: str, tenant: str, as_json: bool) -> None:
    """Revoke a tenant's key by id or prefix; it stops working at once."""
    from app.errors import NotFound
    from app.services import keys as key_service

    with _db().session() as s:
        try:
            row = key_service.revoke_key(s, key_service.get_tenant(s, tenant).id, key_id_or_prefix)
        except NotFound as e:
            _fail(e.message, EXIT_NOT_FOUND)
    _emit({"id": str(row.id), "revoked": True}, as_json, f"revoked {row.prefix}")


# ------------------------------------------------------------------------------------------ helpers
def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


def _fail(message: str, code: int) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(_JSON_META):
        click.echo(json.dumps({"error": {"message": message, "exit_code": code}}), err=True)
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.format(*r).rstrip() for r in [list(headers), *rows])


def _take(items: Iterable[Any], limit: int) -> list[Any]:
    import itertools

    return list(items) if limit == 0 else list(itertools.islice(items, limit))


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("" if x is None else str(x))


def _text(x: Any, width: int = 60) -> str:
    s = x if isinstance(x, str) else " | ".join(str(v) for v in (x.get("text"), x.get("text_pair")) if v is not None)
    return s if len(s) <= width else s[: width - 1] + "…"


def _metric(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    name, value = next(iter(metrics.items()))
    return f"{name} {_num(value)}"


def _progress(job: Any) -> str:
    p = job.progress
    if p is None or not p.total_steps:
        return "-"
    return f"{p.step or 0}/{p.total_steps}"


def _job_text(job: Any) -> str:
    lines = [f"job {job.id}  task {job.task}  status {job.status}  progress {_progress(job)}",
             f"  base {job.base_model}  method {json.dumps(job.method)}"]
    if job.metrics:
        lines.append("  metrics " + "  ".join(f"{k} {_num(v)}" for k, v in job.metrics.items()))
    if job.adapter_version is not None:
        lines.append(f"  adapter: {job.task} v{job.adapter_version}")
    if job.error is not None:
        lines.append(f"  error ({job.error.type}): {job.error.message}")
    return "\n".join(lines)


def _event_text(e: Any) -> str:
    return f"{e.seq:>5}  {e.type:<10} {json.dumps(e.data, default=str)}"


from .cli_batch import register as _register_batch  # noqa: E402

_register_batch(main, remote=remote, emit=_emit, job_text=_job_text, group_cls=SpafitGroup)  # `spafit batch`, `evaluate`

if __name__ == "__main__":
    main()
