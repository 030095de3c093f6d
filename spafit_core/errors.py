"""Every error the core raises on purpose. Each has a stable `type` that the service maps to problem+json."""

from __future__ import annotations


class SpafitError(Exception):
    """Base class. `type` is a stable slug; `field` names the offending input where there is one."""

    type = "spafit-error"
    status = 400  # the HTTP status the service uses for it

    def __init__(self, message: str, *, field: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = detail or {}

    def to_dict(self) -> dict:
        out = {"type": self.type, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.detail:
            out["detail"] = self.detail
        return out


class ConfigError(SpafitError, ValueError):
    """A method, task or training configuration value is invalid."""

    type = "invalid-config"
    status = 422


class UnsupportedArchitectureError(SpafitError):
    """The backbone's layer stack or a requested target module cannot be found."""

    type = "unsupported-architecture"
    status = 422


class BaseModelUnavailable(SpafitError):
    """The base model cannot be loaded: not a model folder, not a hub id, or the hub out of reach and no
    copy in the cache."""

    type = "base-model-unavailable"
    status = 422


class DataError(SpafitError, ValueError):
    """A dataset cannot be read or does not fit the task."""

    type = "invalid-dataset"
    status = 422


class UnsafeDataSource(DataError):
    """A dataset import names something outside a hub dataset: a server path, or a dataset card whose
    `data_files` point outside its own repository (absolute paths, `..`, other schemes)."""

    type = "unsafe-data-source"


class ImportTooLarge(DataError):
    """A dataset import holds more rows or bytes than the service's import limits."""

    type = "import-too-large"
    status = 413


class AdapterError(SpafitError):
    """An adapter folder or blob is malformed, tampered with or does not fit the backbone."""

    type = "invalid-adapter"
    status = 422


class AdapterMismatchError(AdapterError):
    """The adapter was trained on another base model, or its shapes do not match this one."""

    type = "adapter-mismatch"


class AdapterNotLoadedError(SpafitError):
    type = "adapter-not-loaded"
    status = 404


class OverloadedError(SpafitError):
    """The engine's request queue is full: retry later."""

    type = "overloaded"
    status = 503


class TenantOverloadedError(SpafitError):
    """One tenant has its share of the engine's queue waiting already: that tenant retries later, the
    others are not affected."""

    type = "tenant-queue-full"
    status = 429


class PredictionFailedError(SpafitError):
    """The engine failed on these inputs even when run apart from every other request's (the other rows of
    the batch got their answers). `reference` names the log line with the cause."""

    type = "prediction-failed"
    status = 500


class RequestTimeoutError(SpafitError):
    type = "request-timeout"
    status = 504


class NonFiniteError(SpafitError):
    """Training produced a NaN or infinite loss, or an adapter holds non-finite tensors."""

    type = "non-finite"
    status = 422


class TrainingCancelled(SpafitError):
    """Raised inside the training loop when the stop flag is seen; nothing is saved."""

    type = "cancelled"
    status = 409
