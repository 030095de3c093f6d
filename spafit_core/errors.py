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


class DataError(SpafitError, ValueError):
    """A dataset cannot be read or does not fit the task."""

    type = "invalid-dataset"
    status = 422


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


class RequestTimeoutError(SpafitError):
    type = "request-timeout"
    status = 504


class TrainingCancelled(SpafitError):
    """Raised inside the training loop when the stop flag is seen; nothing is saved."""

    type = "cancelled"
    status = 409
