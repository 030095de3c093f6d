"""spafit_core: SPAFIT (Stratified Progressive Adaptation Fine-tuning) and its baselines, training,
the adapter format and the multi-adapter inference engine. No web, database or queue imports.

Names are re-exported lazily, so `import spafit_core.errors` or `spafit_core.data` (what the web
API needs to validate input) never imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_BASE_MODEL": "backbone", "resolve_model_path": "backbone",
    "MethodConfig": "config", "TaskSpec": "config", "TrainConfig": "config",
    "AdapterError": "errors", "AdapterMismatchError": "errors", "ConfigError": "errors", "DataError": "errors",
    "SpafitError": "errors", "UnsupportedArchitectureError": "errors",
    "SpafitModel": "model",
    "finetune": "pipeline", "FinetuneResult": "pipeline",
    "save_adapter": "adapter", "load_adapter": "adapter",
    "Engine": "engine",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spafit_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
