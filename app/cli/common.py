"""What every command shares: the `main` group, the exit codes and the one place errors become them, `--json`,
the `remote` decorator (a command that talks to a service through the SDK), and the output helpers."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from spafit_core import __version__

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_INVALID, EXIT_TIMEOUT = 1, 2, 3, 4, 5, 6, 7
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8000"
EVENTS_PAGE = 1000  # the most job events the service answers at once
JSON_META = "spafit.json"  # ctx.meta flag: the running command was given --json


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
            return exit_code_for_status(exc.status)
        return EXIT_FAILED
    core = sys.modules.get("spafit_core.errors")
    if core is not None and isinstance(exc, core.SpafitError):
        return exit_code_for_status(exc.status)
    app_errors = sys.modules.get("app.errors")
    if app_errors is not None and isinstance(exc, app_errors.AppError):  # admin commands: the services' own errors
        return exit_code_for_status(exc.status)
    migrate = sys.modules.get("app.services.migrate")
    if migrate is not None and isinstance(exc, migrate.SchemaNotCurrent):  # admin commands: `spafit db upgrade`
        return EXIT_FAILED
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None and isinstance(exc, sa.DBAPIError) and _undefined_table(exc):  # not migrated yet (SQLite says
        return EXIT_FAILED                                                            # so with an OperationalError)
    if sa is not None and isinstance(exc, sa.OperationalError):  # admin commands: the database is unreachable
        return EXIT_UNREACHABLE
    if sa is not None and isinstance(exc, sa.ArgumentError | sa.NoSuchModuleError):  # SPAFIT_DATABASE_URL malformed
        return EXIT_USAGE
    alembic = sys.modules.get("alembic.util.exc")
    if alembic is not None and isinstance(exc, alembic.CommandError):  # e.g. `db upgrade --revision bogus`
        return EXIT_USAGE
    pd = sys.modules.get("pydantic")
    if pd is not None and isinstance(exc, pd.ValidationError) and exc.title == "Settings":  # SPAFIT_* misconfigured
        return EXIT_USAGE
    if isinstance(exc, OSError):  # a local file: missing, unwritable, not an adapter folder
        return EXIT_FAILED
    return None


def _undefined_table(exc: BaseException) -> bool:
    return type(getattr(exc, "orig", None)).__name__ == "UndefinedTable" or "no such table" in str(exc)


def error_message(exc: BaseException) -> str:
    """What `error:` says: the exception's own words, but one line where the database's would be a statement."""
    if _undefined_table(exc):
        return "the database has no SPAFIT tables yet: run `spafit db upgrade` first"
    pd = sys.modules.get("pydantic")
    if pd is not None and isinstance(exc, pd.ValidationError) and exc.title == "Settings":
        return _settings_message(exc)
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None and isinstance(exc, sa.DBAPIError) and exc.orig is not None:  # the driver's words, not the
        return " ".join(f"{type(exc.orig).__name__}: {exc.orig}".split())        # SQL, parameters and a link
    return str(exc)


def _settings_message(exc: Any) -> str:
    """One line naming each SPAFIT_* variable that is wrong (pydantic's own text is several lines per error and
    repeats every setting's value)."""
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        if loc:
            got = err.get("input")
            secret = any(w in loc for w in ("token", "secret", "url", "password"))  # never echo credentials
            msg = f"SPAFIT_{loc.upper()}: {msg}" + (f" (got {got!r})" if isinstance(got, str) and not secret else "")
        parts.append(msg)
    return "invalid settings: " + "; ".join(" ".join(p.split()) for p in parts)


def exit_code_for_status(status: int) -> int:
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_AUTH
    if 400 <= status < 500:
        return EXIT_INVALID
    return EXIT_FAILED


def error_payload(exc: BaseException, code: int) -> dict[str, Any]:
    out: dict[str, Any] = {"message": error_message(exc), "exit_code": code, "kind": type(exc).__name__}
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
            if ctx.meta.get(JSON_META):
                click.echo(json.dumps({"error": error_payload(e, code)}, default=str), err=True)
            else:
                click.echo(f"error: {error_message(e)}", err=True)
            ctx.exit(code)


@click.group(cls=SpafitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="spafit")
def main() -> None:
    """Fine-tune SPAFIT adapters and serve every task from one frozen backbone.

    Run the service with `serve` (embedded: API + worker, no setup) or `serve` + `worker` on separate
    machines; try it with `quickstart`; train locally with `train` (convert with `export`, `import`); use a
    service with `datasets`, `jobs`, `tasks`, `predict`, `batch`, `evaluate`, `sweep`; administer with `keys`,
    `db`. Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 auth,
    5 unreachable, 6 invalid, 7 timeout, 130 interrupted.
    """


# ------------------------------------------------------------------------------------------ options
def mark_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=mark_json, expose_value=True,
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
        import httpx
        from spafit_client import Client

        try:
            httpx.URL(url)
        except httpx.InvalidURL as e:
            raise click.BadParameter(f"{url!r}: {e}", param_hint="--url") from None
        if api_key and not api_key.isascii():
            raise click.BadParameter("an API key is ASCII (spafit_<prefix>_<secret>)", param_hint="--api-key")

        with Client(url, api_key=api_key or "", timeout=http_timeout) as client:
            return f(client=client, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ output
def emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


def fail(message: str, code: int) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(JSON_META):
        click.echo(json.dumps({"error": {"message": message, "exit_code": code}}), err=True)
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.format(*r).rstrip() for r in [list(headers), *rows])


def take(items: Iterable[Any], limit: int) -> list[Any]:
    import itertools

    return list(items) if limit == 0 else list(itertools.islice(items, limit))


def num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("" if x is None else str(x))


def clip(x: Any, width: int = 60) -> str:
    s = x if isinstance(x, str) else " | ".join(str(v) for v in (x.get("text"), x.get("text_pair")) if v is not None)
    return s if len(s) <= width else s[: width - 1] + "…"


def metric_text(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    name, value = next(iter(metrics.items()))
    return f"{name} {num(value)}"


def progress_text(job: Any) -> str:
    p = job.progress
    if p is None or not p.total_steps:
        return "-"
    return f"{p.step or 0}/{p.total_steps}"


def job_text(job: Any) -> str:
    lines = [f"job {job.id}  task {job.task}  status {job.status}  progress {progress_text(job)}",
             f"  base {job.base_model}  method {json.dumps(job.method)}"]
    if job.metrics:
        lines.append("  metrics " + "  ".join(f"{k} {num(v)}" for k, v in job.metrics.items()))
    if job.adapter_version is not None:
        lines.append(f"  adapter: {job.task} v{job.adapter_version}")
    if job.error is not None:
        lines.append(f"  error ({job.error.type}): {job.error.message}")
    return "\n".join(lines)


def event_text(e: Any) -> str:
    return f"{e.seq:>5}  {e.type:<10} {json.dumps(e.data, default=str)}"


def exit_on_signal(signum: int, _frame: Any) -> None:
    sys.exit(128 + signum)
