"""spafit_core: SPAFIT (Stratified Progressive Adaptation Fine-tuning) and its baselines, training,
the adapter format and the multi-adapter inference engine. No web, database or queue imports."""

from .backbone import DEFAULT_BASE_MODEL, resolve_model_path
from .config import MethodConfig, TaskSpec, TrainConfig
from .errors import (AdapterError, AdapterMismatchError, ConfigError, DataError, SpafitError,
                     UnsupportedArchitectureError)
from .model import SpafitModel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_MODEL", "AdapterError", "AdapterMismatchError", "ConfigError", "DataError", "MethodConfig",
    "SpafitError", "SpafitModel", "TaskSpec", "TrainConfig", "UnsupportedArchitectureError",
    "resolve_model_path", "__version__",
]
