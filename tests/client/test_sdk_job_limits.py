"""The SDK and the job bounds: `time_limit_s` goes through, an out-of-bounds knob is a ValidationError naming
the field, and a failed job's `error_id` reaches JobFailed (against the live server and worker)."""

from __future__ import annotations

import pytest
from spafit_client import JobFailed, ValidationError
from spafit_client.models import Job, JobError


def test_time_limit_goes_through_and_bounds_are_validation_errors(trained):
    body = dict(task="sdk-limits", train_dataset=trained.train, validation_dataset=trained.validation,
                method={"name": "spafit", "n1": 1, "n2": 2, "rank": 4}, hyperparameters={"epochs": 1, "batch_size": 8})
    with trained.client() as client:
        job = client.jobs.create(**body, time_limit_s=600)
        client.jobs.cancel(job)
        assert job.time_limit_s == 600 and client.jobs.get(job).time_limit_s == 600
        with pytest.raises(ValidationError) as info:
            client.jobs.create(**{**body, "method": {"name": "spafit", "rank": 2**31}})
        assert "method.rank" in str(info.value.errors)
        with pytest.raises(ValidationError) as info:
            client.jobs.create(**body, time_limit_s=10**8)
        assert info.value.status == 422


def test_job_failed_carries_the_error_id():
    job = Job.model_validate({"id": "j", "task": "t", "task_type": "single_label_classification", "base_model": "m",
                              "status": "failed", "train_dataset": "d", "created_at": "2026-12-01T00:00:00Z",
                              "error": {"type": "internal-error", "message": "words", "error_id": "abc"}})
    failed = JobFailed(job)
    assert (failed.error_type, failed.error_id) == ("internal-error", "abc")
    assert JobError(type="non-finite", message="m").error_id is None
