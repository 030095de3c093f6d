"""Service configuration: one `Settings` class read from SPAFIT_* environment variables (or a `.env` file).

With no variables set, the service runs embedded on one machine: SQLite and a SQLite-backed Celery broker
under `data_dir`, auth off. Production is `SPAFIT_MODE=server` plus the shared database and broker URLs;
server mode refuses to start with anything unsafe (auth off, SQLite, the local broker).
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
SCOPES = ("admin", "train", "predict")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MIN_SCRAPE_TOKEN = 16  # characters of `metrics_token`: `openssl rand -hex 16` gives 32


def _split_bind(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9100`) -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def _split_origins(value: object) -> object:
    """`SPAFIT_CORS_ORIGINS` may be a JSON list or a comma-separated string."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _split_weights(value: object) -> object:
    """`SPAFIT_BATCH_TENANT_WEIGHTS` may be a JSON object or `tenant=weight` pairs, comma-separated."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("{"):
            import json

            return json.loads(value)
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("expected tenant=weight pairs, comma-separated, or a JSON object")
        return {k.strip(): v.strip() for k, v in pairs}
    return value


def normalize_database_url(url: str) -> str:
    """Postgres URLs without a driver get psycopg 3 (the one installed), so a plain `postgresql://` works."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


MAX_DURATION_S = 10 * 365 * 86400  # ten years: longer is "never", and timedelta() overflows not far above
MAX_DAYS = 36500


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _check_device(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip()):
        raise ValueError(f"{value!r} is not a device: auto, cpu, cuda, cuda:N or mps")
    return value.strip() if isinstance(value, str) else value


def _check_database_url(url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect()
    except Exception as e:  # not a URL, or a dialect / driver not installed
        raise ValueError(f"SPAFIT_DATABASE_URL is not a usable SQLAlchemy URL ({type(e).__name__}: {e})") from None


def _check_broker_url(url: str) -> None:
    from kombu.transport import TRANSPORT_ALIASES

    scheme = url.split("://", 1)[0].split("+", 1)[0]  # Celery's "sqla+sqlite://" is the "sqla" transport
    if "://" not in url or scheme not in TRANSPORT_ALIASES:
        raise ValueError(f"SPAFIT_BROKER_URL's scheme {scheme!r} is no broker transport Celery knows (e.g. "
                         "redis://host:6379/0)")
    _check_host_port("SPAFIT_BROKER_URL", url, alternatives=True)


def _check_host_port(name: str, url: str, *, alternatives: bool = False) -> None:
    """A port that is not a number or out of range passed the scheme checks and failed only once a client was made
    (a traceback at startup or on the first request)."""
    from urllib.parse import urlsplit

    # Kombu takes a list of URLs separated by ";" (failover, Sentinel: sentinel://h1:26379;sentinel://h2:26379):
    # each is checked alone. The error never quotes the URL or Python's words (they quote the "port", which is a
    # piece of the password when the password holds an unencoded /, ? or #).
    for part in url.split(";") if alternatives else [url]:
        parsed = urlsplit(part.strip())
        try:
            _ = parsed.port
        except ValueError:
            raise ValueError(f"{name} is malformed: its port is not a number from 0 to 65535 (a password holding "
                             "/, ?, # or @ must be percent-encoded)") from None
        db = parsed.path.strip("/")
        if parsed.scheme in ("redis", "rediss") and db and not (db.isascii() and db.isdigit()):
            # Celery's worker died on it with a traceback (and exit status 0), the API on its first Redis call
            raise ValueError(f"{name} is malformed: the Redis database after the port must be a number (e.g. /0)")


def _check_redis_url(url: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("SPAFIT_REDIS_URL must start with redis://, rediss:// or unix://")
    _check_host_port("SPAFIT_REDIS_URL", url)


def _check_durations(settings: BaseSettings) -> None:
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name.endswith("_s") and value > MAX_DURATION_S:
            raise ValueError(f"SPAFIT_{name.upper()} is {value}: at most {MAX_DURATION_S} seconds (ten years)")
        if name.endswith("_days") and value > MAX_DAYS:
            raise ValueError(f"SPAFIT_{name.upper()} is {value}: at most {MAX_DAYS} days")


class Settings(BaseSettings):
    # No inf / NaN anywhere: an infinite retention or timeout reached timedelta() and stopped the collector and the
    # requeuer for good (OverflowError every round); durations are also bounded below (`_check_durations`).
    model_config = SettingsConfigDict(env_prefix="SPAFIT_", env_file=".env", extra="ignore", allow_inf_nan=False)

    mode: Literal["embedded", "server"] = Field(
        default="embedded",
        description="`embedded`: one machine, SQLite + local broker, auth may be off. `server`: shared "
        "Postgres + Redis, auth required; unsafe values refuse to start.",
    )
    data_dir: Path = Field(
        default=Path(".spafit"),
        description="Folder for the embedded database, the local broker and caches. Created on demand.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry. Default (embedded): `sqlite:///<data_dir>/spafit.db`. "
        "Server mode needs Postgres, e.g. `postgresql+psycopg://user:pass@host/spafit`.",
    )
    database_connect_timeout: int = Field(
        default=5, ge=1, description="Seconds to wait for a database connection before failing (Postgres)."
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL. Default (embedded): `sqla+sqlite:///<data_dir>/broker.db`, which "
        "needs no server. Server mode needs a real broker, e.g. `redis://host:6379/0`.",
    )
    broker_key_prefix: str = Field(
        default="",
        description="Prefix for every broker key (kombu `global_keyprefix`), so several deployments or "
        "test sessions can share one Redis. Every replica of a deployment uses the same prefix, and a database "
        "serves one deployment: a queued job sent under another prefix is re-sent through this one's broker.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis holding per-tenant limits shared by every API replica (open event "
        "streams, prediction rows in flight). "
        "Default: the broker's URL when it is Redis; otherwise each process keeps its own counts (embedded).",
    )
    auth_enabled: bool | None = Field(
        default=None,
        description="Require API keys. Default: off in embedded mode (every request acts as the built-in "
        "`local` tenant), on in server mode, where turning it off is refused.",
    )
    auto_migrate: bool | None = Field(
        default=None,
        description="Apply database migrations at startup. Default: on in embedded mode, off in server "
        "mode (run `spafit db upgrade` once per deploy instead).",
    )
    max_upload_bytes: int = Field(default=20 * MiB, ge=1, description="Largest dataset file accepted.")
    max_upload_rows: int = Field(
        default=1_000_000, ge=1,
        description="Most rows in an uploaded dataset file (more: 413). Reading and checking a file takes about 4 s "
        "of CPU and 250 MB per million rows in the API process; import larger datasets from the Hub (read by the "
        "worker).",
    )
    uploads_in_flight: int = Field(
        default=2, ge=1, le=20,
        description="Dataset uploads read and checked at once in one API process. One tenant reads one at a time "
        "(a second gets 429 too-many-uploads); beyond this many, the others wait up to upload_wait_s (then 503).",
    )
    upload_wait_s: float = Field(
        default=30.0, ge=0, description="How long an upload waits for its turn to be read before it gets 503."
    )
    max_request_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest request body of any kind; larger ones get 413 before they are read. "
        "Default: `max_upload_bytes` + 1 MiB (room for the multipart envelope).",
    )
    max_import_bytes: int | None = Field(
        default=None, ge=1,
        description="Largest dataset a Hugging Face import may store (its rows as JSON Lines); reading stops "
        "once it is passed and the import fails. Default: `max_upload_bytes`.",
    )
    max_import_rows: int = Field(
        default=1_000_000, ge=1,
        description="Most rows a Hugging Face import may hold; reading stops once it is passed and the import "
        "fails (ask for fewer with the import's `max_rows`).",
    )
    import_timeout_s: float = Field(
        default=900.0, gt=0,
        description="Longest a dataset import may run in the worker; an import still `importing` this long "
        "after it started (its worker lost) is marked failed.",
    )
    max_concurrent_imports: int = Field(
        default=2, ge=1, description="Dataset imports one tenant may have `importing` at once; more get 429."
    )
    max_predict_inputs: int = Field(default=64, ge=1, description="Most inputs in one predict request.")
    peft_conversions_in_flight: int = Field(
        default=2, ge=1, le=20,
        description="PEFT conversions (`GET /v1/tasks/{task}/adapter?format=peft`, a PEFT import) running at once "
        "in one API process; each loads the base model in full. One tenant runs one at a time (a second gets 429); "
        "beyond this many, the others wait their turn.",
    )
    peft_conversion_wait_s: float = Field(
        default=30.0, ge=0,
        description="How long a PEFT conversion waits for a slot before the request gets 503 with Retry-After.",
    )
    peft_export_cache_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0,
        description="PEFT exports kept in memory per API process, by the adapter's content: the same version "
        "downloaded again is not converted again (0: no cache).",
    )
    default_base_model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="Backbone used when a job names none (the packaged MiniLM loads without network).",
    )
    allowed_base_models: Annotated[list[str], NoDecode, BeforeValidator(_split_origins)] = Field(
        default_factory=list,
        description="In server mode, the base models jobs may train on besides `default_base_model` "
        "(comma-separated hub ids or local folders); a job naming another is refused (422). Embedded mode "
        "allows any hub id or folder.",
    )
    job_max_attempts: int = Field(
        default=3, ge=1, description="Times a job is tried (first run + retries after worker loss) before it fails."
    )
    job_visibility_timeout: int = Field(
        default=7 * 24 * 3600, ge=60,
        description="Seconds the broker waits for a worker to acknowledge a job before re-delivering it (Redis "
        "`visibility_timeout`). Must exceed the longest job, or a long run would be delivered twice.",
    )
    job_heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="How often a training worker records that it is alive and checks for cancel."
    )
    job_heartbeat_stale_s: float = Field(
        default=60.0, gt=0,
        description="A running job whose heartbeat is older than this is considered orphaned: it is re-queued and "
        "resumed from its last checkpoint.",
    )
    job_requeue_interval_s: float = Field(
        default=30.0, gt=0,
        description="How often the API looks for orphaned jobs (stale running jobs, queued jobs whose broker "
        "message may be lost) and sends them to the broker again. Duplicates are harmless: claims are atomic.",
    )
    checkpoint_every_steps: int = Field(
        default=50, ge=1, description="Training steps between resumable checkpoints (also saved at every epoch end)."
    )
    job_log_every_steps: int = Field(default=5, ge=1, description="Training steps between progress events.")
    job_claim_timeout_s: float = Field(
        default=900.0, gt=0,
        description="A queued job handed to the broker that no worker claimed within this is sent again (its "
        "worker may have died between taking the message and claiming the job), once no message waits in the "
        "training queue (a job behind a backlog is not lost). A duplicate is a no-op.",
    )
    job_db_retry_s: float = Field(
        default=60.0, ge=0,
        description="How long a training worker retries a failed database write (progress, event, checkpoint, "
        "result) with backoff before it ends the attempt; the job then resumes from its last checkpoint.",
    )
    job_time_limit_s: int = Field(
        default=24 * 3600, ge=60,
        description="Longest wall-clock time a job may take from its first start; a job may ask for less "
        "(`time_limit_s`). Past it the job fails with type `time-limit`.",
    )
    job_max_steps: int = Field(
        default=1_000_000, ge=1,
        description="Most optimizer steps one job may take (epochs x steps per epoch); more is refused at "
        "creation (422).",
    )
    max_active_jobs_per_tenant: int = Field(
        default=64, ge=1,
        description="Training jobs one tenant may have queued or running at once, each sweep trial counting as "
        "one (64: room for the largest sweep); one more gets 429 with Retry-After, a sweep with more trials "
        "than this 422. Counted in the database, so it holds across API replicas.",
    )
    tenant_max_stored_bytes: int = Field(
        default=10 << 30, ge=0,
        description="Bytes one tenant may keep in the database every tenant shares: its datasets, adapter versions "
        "(trained and imported) and batch prediction results, each counted at its own size (0: no limit). An "
        "upload, an import or a result chunk that would pass it is refused (403 `storage-quota-exceeded`; an import "
        "or a batch prediction then fails with that error), and so are new training, batch prediction and evaluation "
        "jobs while the tenant is at it; deleting datasets, tasks or finished batch predictions makes room. `GET /v1/usage` "
        "shows where a tenant stands. A training job that ends still registers its adapter (a few MB at most).",
    )
    batch_max_rows_per_job: int = Field(
        default=1_000_000, ge=1,
        description="Most dataset rows one batch prediction or evaluation job may take (per job, for every tenant); "
        "a larger dataset is refused at creation (422 `too-many-rows`).",
    )
    batch_chunk_rows: int = Field(
        default=512, ge=1, le=100_000,
        description="Rows a batch prediction job predicts and stores as one chunk of its result; a resumed job "
        "starts after its last stored chunk.",
    )
    batch_forward_rows: int = Field(
        default=64, ge=1, le=4096,
        description="Rows of a batch prediction or evaluation job in one engine forward pass.",
    )
    engine_device: Annotated[str, BeforeValidator(_check_device)] = Field(
        default="auto", description="Device of the serving engine: auto, cpu, cuda, cuda:N (or mps).")
    engine_cache_bytes: int = Field(
        default=256 * MiB, ge=1,
        description="Adapter bytes held on the engine's device (LRU, by bytes). A miss loads from the registry.",
    )
    engine_cpu_cache_bytes: int = Field(
        default=1024 * MiB, ge=0,
        description="On a GPU host, adapter bytes kept in host memory after eviction from the GPU (second tier).",
    )
    preload_base_model: bool = Field(
        default=True, description="Load the default backbone when the API starts (else on the first predict)."
    )
    batch_max_size: int = Field(default=32, ge=1, description="Most rows in one serving forward pass.")
    predict_fast_path: bool = Field(
        default=True, description="Answer `POST /v1/tasks/{task}/predict` requests that every check lets through "
        "in front of the middleware and routing layers (the same checks, the same answers; benchmarks/README.md "
        "\"Serving\"). false: every request goes through the whole stack.",
    )
    batch_max_wait_ms: float = Field(default=5.0, ge=0, description="How long a row waits for others to batch with.")
    batch_max_tokens: int = Field(default=16384, ge=64, description="Most padded tokens in one forward pass.")
    batch_max_queue: int = Field(
        default=2048, ge=1, description="Prediction rows admitted and not yet answered, all tenants; beyond it predict "
        "answers 503 with Retry-After."
    )
    batch_max_queue_per_tenant: int = Field(
        default=512, ge=1,
        description="Prediction rows one tenant may have admitted and not yet answered, across every API replica "
        "(in Redis; per process without it, or while Redis is unreachable); beyond it that tenant's predicts get "
        "429 with Retry-After while other tenants are served. Decided in the process, with no Redis call on the "
        "request path: each replica counts its own rows exactly and reads the other replicas' counts back every 0.1 s, "
        "so across replicas a tenant can exceed it by what the other replicas admitted for it within about one such "
        "interval (two at worst). A value over batch_max_queue is clamped to it (with a warning at startup).",
    )
    tenant_rows_lease_s: float = Field(
        default=10.0, ge=1, le=3600,
        description="Each API replica renews its lease on the rows it counts in Redis every third of this; the rows "
        "of a replica that died are freed after it, so a crashed replica never keeps a tenant at its cap.",
    )
    batch_shared_max_size: int = Field(
        default=2, ge=0, description="Most rows a serving forward pass takes from tenants with a backlog while a "
        "light tenant is being served (its rows ran within the last second and left its queue empty) and another "
        "tenant's rows wait (a tenant alone is never bounded by its own): the light tenant's next rows wait for at "
        "most one pass this small, then run in a pass of their own. On a CPU a pass costs about "
        "its rows; on a GPU, where it does not, set it to 0 (no bound, and a light tenant's rows share their pass). "
        "Smaller shortens a light tenant's wait; on a CPU it costs the backlogged tenants little (benchmarks/"
        "RELIABILITY.md: 1, 2 and 4 measured)."
    )
    batch_yield_to_light: bool = Field(
        default=True, description="A serving forward pass of tenants with a backlog steps aside at its next layer "
        "boundary when a light tenant's rows arrive: they run first, then the pass goes on where it stopped "
        "(nothing computed twice; a pass steps aside at most three times). The light tenant waits for one layer of "
        "the pass in flight, not all of it (benchmarks/RELIABILITY.md, stop 27)."
    )
    batch_tenant_quantum: int = Field(
        default=512, ge=1, description="Tokens a tenant of weight 1 is served per turn of the deficit round robin "
        "(a row costs its length): under contention tenants share the engine's work, not just its rows."
    )
    batch_tenant_weights: Annotated[dict[str, float], NoDecode, BeforeValidator(_split_weights)] = Field(
        default_factory=dict,
        description="Serving weights by tenant id, `id=2,other-id=0.5` or a JSON object; unlisted tenants weigh 1. "
        "Under contention a tenant gets rows in proportion to its weight.",
    )
    engine_max_backbones: int = Field(
        default=4, ge=1,
        description="Base models held by the serving engine at once (LRU; one running a batch is never dropped). "
        "A dropped one loads again on its next predict.",
    )
    engine_slot_kernel: Literal["torch"] = Field(
        default="torch",
        description="How the serving engine applies each row's adapter rows from its slot pools: `torch` (gather, "
        "then batched matmul). A segmented-matmul kernel (SGMV/BGMV) registers under its own name in "
        "`spafit_core.slots.KERNELS`.",
    )
    predict_timeout_s: float = Field(default=30.0, gt=0, description="Longest a predict request may take.")
    max_input_chars: int = Field(default=20000, ge=1, description="Longest text accepted in one predict input.")
    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_split_origins)] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS, comma-separated or a JSON list; empty disables CORS.",
    )
    allowed_hosts: Annotated[list[str] | None, NoDecode, BeforeValidator(_split_origins)] = Field(
        default=None,
        description="Host names the API answers to (the `Host` header; `*.example.com` matches subdomains, `*` "
        "any); others get 400, which stops DNS rebinding. Default: the loopback names in embedded mode, `*` in "
        "server mode (auth on: a rebound page holds no key). Set it to the public name(s) in production.",
    )
    insecure_bind: bool = Field(
        default=False,
        description="Let `spafit serve` bind a non-loopback address in embedded mode with auth off (anyone who "
        "reaches the port acts as the `local` tenant). Same as `--insecure-bind`; logs a warning.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that opens `/metrics` on the API port (`Authorization: Bearer <token>`); at "
        "least 16 characters (`openssl rand -hex 16`), or the service refuses to start. Server mode without it "
        "(and without `metrics_bind`) answers 404 there: metrics are closed by default.",
    )
    metrics_bind: str | None = Field(
        default=None,
        description="`host:port` of a separate, unauthenticated metrics listener (e.g. `0.0.0.0:9100` on a "
        "private network); with it, the API port never serves `/metrics`. One per API process.",
    )
    sse_max_streams_per_tenant: int = Field(
        default=16, ge=1,
        description="Live event streams (`/v1/jobs/{id}/events`, text/event-stream) one tenant may hold open at "
        "once, across every API replica; one more gets 429 with Retry-After.",
    )
    sse_max_duration_s: float = Field(
        default=600.0, gt=0, le=86400,
        description="Longest an event stream stays open: then the server sends a `reconnect` event and closes it, "
        "and the client resumes with `Last-Event-ID` (so streams spread over replicas and deploys finish).",
    )
    sse_slot_ttl_s: float = Field(
        default=30.0, ge=1, le=3600,
        description="An open stream renews its slot (in Redis) every third of this; the slots of an API process "
        "that died lapse after it, so a crashed replica never keeps a tenant at its cap.",
    )
    sse_ping_interval_s: float = Field(
        default=15.0, gt=0, le=3600, description="A quiet event stream sends a keep-alive comment this often."
    )
    sse_poll_interval_s: float = Field(
        default=0.5, gt=0, le=60,
        description="How often one poller per API process looks for new events of every watched job (one short "
        "query for all open streams; no stream holds a database connection while it waits).",
    )
    event_retention_days: float = Field(
        default=30.0, gt=0,
        description="Events of finished jobs are pruned by the collector once older than this (the job row, its "
        "metrics and its adapter version stay).",
    )
    gc_interval_s: float = Field(
        default=3600.0, gt=0,
        description="How often the API runs the collector (`spafit db gc` by hand): checkpoints of finished jobs, "
        "blobs nothing references, events past `event_retention_days`.",
    )
    gc_blob_grace_s: float = Field(
        default=3600.0, ge=0,
        description="A blob nothing references is collected only once it was last stored this long ago, so bytes "
        "written just before the row that will point at them are never taken.",
    )
    readiness_timeout: float = Field(
        default=3.0, gt=0, description="Seconds each `/readyz` check may take before it counts as failed."
    )
    log_level: Annotated[Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"], BeforeValidator(_upper)] = Field(
        default="INFO", description="Python logging level of the service.")
    webhook_allow_private_urls: bool = Field(
        default=False,
        description="Allow job webhook URLs to loopback, link-local and private addresses in server mode (checked "
        "at job creation and again at each send, against DNS rebinding). Embedded mode always allows loopback.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300, description="Longest one webhook POST may take.")
    webhook_max_attempts: int = Field(
        default=10, ge=1, le=50, description="Times a webhook is sent before its delivery is marked failed."
    )
    webhook_retry_base_s: float = Field(
        default=5.0, gt=0,
        description="Delay before a webhook's second attempt; each later one doubles it (up to webhook_retry_max_s).",
    )
    webhook_retry_max_s: float = Field(default=3600.0, gt=0, description="Longest delay between two webhook attempts.")
    webhook_tenant_share: float = Field(
        default=0.25, ge=0.01, le=1,
        description="Share of the workers' time one tenant's webhook attempts may take over time (the workers also "
        "run training): an attempt of d seconds uses d / share of the tenant's turn, and its next attempt waits "
        "while the tenant is more than webhook_tenant_burst_s ahead. Receivers that hang for the whole timeout "
        "then delay that tenant's own webhooks, not other tenants' deliveries and jobs. Waiting uses no attempt.",
    )
    webhook_tenant_burst_s: float = Field(
        default=60.0, ge=0, le=3600,
        description="How far ahead of the clock a tenant's webhook attempts may run before they wait "
        "(see webhook_tenant_share): with the defaults, about two attempts that hang for the whole timeout at once.",
    )
    webhook_secret_overlap_s: float = Field(
        default=24 * 3600.0, ge=0,
        description="After a tenant's webhook secret is rotated, deliveries are also signed with the previous one "
        "for this long, so receivers can switch without losing a delivery.",
    )

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Settings:
        embedded = self.mode == "embedded"
        if self.database_url is None:
            if not embedded:
                raise ValueError(
                    "server mode needs SPAFIT_DATABASE_URL (e.g. postgresql+psycopg://user:pass@host/spafit)"
                )
            self.database_url = f"sqlite:///{self.data_dir / 'spafit.db'}"
        self.database_url = normalize_database_url(self.database_url)
        _check_database_url(self.database_url)
        if self.broker_url is None:
            if not embedded:
                raise ValueError("server mode needs SPAFIT_BROKER_URL (e.g. redis://host:6379/0)")
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        _check_broker_url(self.broker_url)
        _check_durations(self)
        if self.redis_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            self.redis_url = self.broker_url.split(";", 1)[0].strip()  # of a failover list, its first (redis-py takes one)
        if self.redis_url:  # empty: no shared Redis, as before
            _check_redis_url(self.redis_url)
        if self.auth_enabled is None:
            self.auth_enabled = not embedded
        if self.auto_migrate is None:
            self.auto_migrate = embedded
        if not self.allowed_hosts:  # unset or empty: the mode's default
            self.allowed_hosts = list(LOOPBACK_HOSTS) if embedded else ["*"]
        if self.metrics_token is not None and not self.metrics_token.get_secret_value():
            self.metrics_token = None  # an empty variable (compose's `${VAR:-}`) means unset, never "no token"
        if self.metrics_token is not None and len(self.metrics_token.get_secret_value()) < MIN_SCRAPE_TOKEN:
            raise ValueError(f"SPAFIT_METRICS_TOKEN must be at least {MIN_SCRAPE_TOKEN} characters")
        if self.metrics_bind is not None and not self.metrics_bind.strip():
            self.metrics_bind = None
        if self.metrics_bind is not None:
            _split_bind(self.metrics_bind)  # ValueError (a settings error) when malformed
        if self.max_request_bytes is None:
            self.max_request_bytes = self.max_upload_bytes + MiB
        if self.max_import_bytes is None:
            self.max_import_bytes = self.max_upload_bytes
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError("SPAFIT_MAX_REQUEST_BYTES must be at least SPAFIT_MAX_UPLOAD_BYTES, or no upload "
                             "could reach the cap")
        bad = {t: w for t, w in self.batch_tenant_weights.items() if not 0 < w < float("inf")}
        if bad:
            raise ValueError(f"SPAFIT_BATCH_TENANT_WEIGHTS must be positive and finite; got {bad}")
        if self.batch_max_queue_per_tenant < self.max_predict_inputs:  # the share as set, before any clamp below
            raise ValueError("SPAFIT_BATCH_MAX_QUEUE_PER_TENANT must be at least SPAFIT_MAX_PREDICT_INPUTS, or a "
                             "full request could never be queued")
        if self.batch_max_queue_per_tenant > self.batch_max_queue:  # a share over the whole: clamped, said once
            logging.getLogger("spafit.settings").warning(
                "batch_max_queue_per_tenant (%d) is over batch_max_queue (%d): clamped to it",
                self.batch_max_queue_per_tenant, self.batch_max_queue)
            self.batch_max_queue_per_tenant = self.batch_max_queue
        if not embedded:  # fail fast on anything that is only safe on one machine
            if not self.auth_enabled:
                raise ValueError(
                    "SPAFIT_AUTH_ENABLED=false is only allowed with SPAFIT_MODE=embedded; "
                    "server mode always requires API keys"
                )
            if self.database_url.startswith("sqlite"):
                raise ValueError("server mode needs a shared database (Postgres); SQLite is for embedded mode")
            if self.broker_url.startswith("sqla+sqlite"):
                raise ValueError("server mode needs a shared broker (e.g. Redis); the SQLite broker is for embedded mode")
        return self

    @property
    def metrics_listener(self) -> tuple[str, int] | None:
        """(host, port) of the separate metrics listener, if one is configured."""
        return _split_bind(self.metrics_bind) if self.metrics_bind else None

    @property
    def metrics_on_api_port(self) -> bool:
        """Whether `/metrics` on the API port answers at all: embedded mode, or a scrape token is set, and no
        separate listener."""
        return self.metrics_bind is None and (self.mode == "embedded" or self.metrics_token is not None)

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
