"""Service configuration: one `Settings` class read from SPAFIT_* environment variables (or a `.env` file).

With no variables set, the service runs embedded on one machine: SQLite and a SQLite-backed Celery broker
under `data_dir`, auth off. Production is `SPAFIT_MODE=server` plus the shared database and broker URLs;
server mode refuses to start with anything unsafe (auth off, SQLite, the local broker).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
SCOPES = ("admin", "train", "predict")


def _split_origins(value: object) -> object:
    """`SPAFIT_CORS_ORIGINS` may be a JSON list or a comma-separated string."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def normalize_database_url(url: str) -> str:
    """Postgres URLs without a driver get psycopg 3 (the one installed), so a plain `postgresql://` works."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPAFIT_", env_file=".env", extra="ignore")

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
        "test sessions can share one Redis.",
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
    max_request_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest request body of any kind; larger ones get 413 before they are read. "
        "Default: `max_upload_bytes` + 1 MiB (room for the multipart envelope).",
    )
    max_predict_inputs: int = Field(default=64, ge=1, description="Most inputs in one predict request.")
    default_base_model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="Backbone used when a job names none (the packaged MiniLM loads without network).",
    )
    allowed_base_models: Annotated[list[str], NoDecode, BeforeValidator(_split_origins)] = Field(
        default_factory=list,
        description="In server mode, base models that are local folders must be listed here (comma-separated); "
        "hub ids (`owner/name`) and the packaged MiniLM are always allowed. Embedded mode allows any folder.",
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
    engine_device: str = Field(default="auto", description="Device of the serving engine: auto, cpu, cuda, cuda:N.")
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
    batch_max_wait_ms: float = Field(default=5.0, ge=0, description="How long a row waits for others to batch with.")
    batch_max_tokens: int = Field(default=16384, ge=64, description="Most padded tokens in one forward pass.")
    batch_max_queue: int = Field(
        default=2048, ge=1, description="Rows waiting to be served; beyond it predict answers 503 with Retry-After."
    )
    predict_timeout_s: float = Field(default=30.0, gt=0, description="Longest a predict request may take.")
    max_input_chars: int = Field(default=20000, ge=1, description="Longest text accepted in one predict input.")
    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_split_origins)] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS, comma-separated or a JSON list; empty disables CORS.",
    )
    readiness_timeout: float = Field(
        default=3.0, gt=0, description="Seconds each `/readyz` check may take before it counts as failed."
    )
    log_level: str = Field(default="INFO", description="Python logging level of the service.")

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
        if self.broker_url is None:
            if not embedded:
                raise ValueError("server mode needs SPAFIT_BROKER_URL (e.g. redis://host:6379/0)")
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if self.auth_enabled is None:
            self.auth_enabled = not embedded
        if self.auto_migrate is None:
            self.auto_migrate = embedded
        if self.max_request_bytes is None:
            self.max_request_bytes = self.max_upload_bytes + MiB
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError("max_request_bytes must be at least max_upload_bytes, or no upload could reach the cap")
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
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
