"""spafit_client: the Python SDK of the SPAFIT service (httpx + pydantic; no torch).

    from spafit_client import Client

    with Client("http://127.0.0.1:8000", api_key="spafit_...") as client:
        train = client.datasets.upload("train.csv")
        job = client.jobs.create(task="sentiment", train_dataset=train, hyperparameters={"epochs": 3})
        client.jobs.wait(job.id)                                 # a progress bar on stderr
        print(client.tasks.predict("sentiment", ["a great film"]).predictions[0].label)

`AsyncClient` is the same API for asyncio. Errors are typed (see `spafit_client.errors`).
"""

from ._async_client import AsyncClient
from ._base import DEFAULT_BASE_URL, RetryPolicy
from ._client import Client
from ._version import __version__
from .errors import (
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DatasetImportFailed,
    ImportWaitTimeout,
    JobCancelled,
    JobFailed,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SpafitAPIError,
    SpafitError,
    StorageQuotaExceededError,
    ValidationError,
    WaitTimeout,
    WebhookVerificationError,
)
from .models import (
    AdapterVersion,
    Dataset,
    FanOutPredictions,
    Health,
    Hyperparameters,
    Job,
    JobError,
    JobEvent,
    LabelScore,
    Method,
    Page,
    Prediction,
    Progress,
    Readiness,
    StoredBytes,
    Task,
    TaskPredictions,
    Usage,
)
from .pagination import AsyncPager, SyncPager
from .webhooks import sign_webhook, verify_webhook

__all__ = [
    "DEFAULT_BASE_URL", "AsyncClient", "Client", "RetryPolicy", "__version__",
    "APIConnectionError", "APIResponseError", "APITimeoutError", "AuthenticationError", "BadRequestError", "ConflictError",
    "DatasetImportFailed", "ImportWaitTimeout", "JobCancelled", "JobFailed", "NotFoundError", "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "ServerError", "SpafitAPIError", "SpafitError",
    "StorageQuotaExceededError", "ValidationError",
    "WaitTimeout", "WebhookVerificationError", "sign_webhook", "verify_webhook",
    "AdapterVersion", "Dataset", "FanOutPredictions", "Health", "Hyperparameters", "Job", "JobError", "JobEvent",
    "LabelScore", "Method", "Page", "Prediction", "Progress", "Readiness", "StoredBytes", "Task", "TaskPredictions",
    "Usage",
    "AsyncPager", "SyncPager",
]
