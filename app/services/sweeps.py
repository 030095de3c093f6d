"""Stratification sweeps: one job that trains a grid over SPAFIT's n1 / n2 / rank and keeps the best.

The sweep is a parent job; each grid point is a `trial` job of its own on the training queue, so trials
run in parallel on as many workers as there are (a Celery group of independent messages). No chord: a
chord needs a result backend, and job state lives in the database. Instead every trial, when it ends,
calls `trial_finished`, which locks the parent row, records the trial as an event, and when the last
trial is in, registers the best adapter by validation metric (optionally under a trainable-parameter
budget) as the task's new version. The database lock makes "the last trial" happen exactly once.

Settling is idempotent, so whoever notices first may do it: the trial's worker, a redelivered message of a
trial that is already final, the API's requeuer (`unsettled`: running sweeps whose trials are all final, as
when a worker died between a trial's result and the settling). Each trial is recorded once.
"""

from __future__ import annotations

import itertools
import math
import uuid

from sqlalchemy import exists, select
from sqlalchemy.orm import aliased

from spafit_core.errors import ConfigError, SpafitError

from ..db import Database
from ..errors import AppError
from ..models import JOB_FINAL_STATUSES, Job, JobEvent, utcnow
from . import blobs, events, registry


def grid(method: dict, sweep: dict, depth: int | None) -> list[dict]:
    """The trial methods: every combination of the listed n1 / n2 / rank values (others from `method`),
    invalid combinations (n1 > n2, out of range) left out, duplicates after resolution removed."""
    from spafit_core.adapter_schema import MAX_LAYERS
    from spafit_core.config import MethodConfig

    axes = {name: sweep.get(name) or [method.get(name)] for name in ("n1", "n2", "rank")}
    trials, seen = [], set()
    for n1, n2, rank in itertools.product(axes["n1"], axes["n2"], axes["rank"]):
        body = {**{k: v for k, v in method.items() if k != "sweep"}, "n1": n1, "n2": n2, "rank": rank}
        if any(isinstance(v, int | float) and abs(v) > MAX_LAYERS for v in (n1, n2)):
            continue  # method.n1 / n2's own bound: a layer of no model, even where the depth is not known here
        try:
            cfg = MethodConfig.from_dict({k: v for k, v in body.items() if v is not None})
            key = (n1, n2, rank)
            if depth is not None:
                plan = cfg.resolve(depth)
                key = (plan.n1, plan.n2, rank)
        except ConfigError:
            continue
        if key not in seen:
            seen.add(key)
            trials.append(cfg.to_dict())
    if not trials:
        raise ConfigError("the sweep has no valid combination of n1 <= n2 within the model's depth",
                          field="method.sweep")
    if len(trials) > sweep["max_trials"]:
        raise ConfigError(f"the sweep has {len(trials)} combinations, more than max_trials={sweep['max_trials']}; "
                          "list fewer values or raise max_trials (at most 64)", field="method.sweep.max_trials")
    return trials


def create_trials(session, parent: Job, depth: int | None) -> list[Job]:
    trials = []
    for i, method in enumerate(grid(parent.method, parent.method["sweep"], depth)):
        trial = Job(tenant_id=parent.tenant_id, kind="trial", parent_job_id=parent.id,
                    task_name=parent.task_name, task_type=parent.task_type, base_model=parent.base_model,
                    train_dataset_id=parent.train_dataset_id, validation_dataset_id=parent.validation_dataset_id,
                    text_fields=parent.text_fields, label_field=parent.label_field, method=method,
                    hyperparameters=parent.hyperparameters, status="queued", max_attempts=parent.max_attempts,
                    time_limit_s=parent.time_limit_s, progress={"trial": i})  # each trial within the sweep's limit
        session.add(trial)
        trials.append(trial)
    parent.progress = {"step": 0, "total_steps": len(trials)}
    return trials


def trial_finished(db: Database, trial_id: uuid.UUID) -> None:
    """Record a finished trial on its sweep; finish the sweep when it was the last one."""
    with db.session() as s:
        parent_id = s.scalar(select(Job.parent_job_id).where(Job.id == trial_id))
    if parent_id is not None:
        settle(db, parent_id, trial_id)


def unsettled(db: Database, limit: int = 100) -> list[uuid.UUID]:
    """Running sweeps none of whose trials is still queued or running."""
    trial = aliased(Job)
    pending = exists().where(trial.parent_job_id == Job.id, trial.status.not_in(JOB_FINAL_STATUSES))
    with db.session() as s:
        return list(s.scalars(select(Job.id).where(Job.kind == "sweep", Job.status == "running", ~pending)
                              .limit(limit)))


def settle(db: Database, parent_id: uuid.UUID, trial_id: uuid.UUID | None = None) -> None:
    """Under a lock on the sweep's row: record every final trial not recorded yet and, once every trial is
    final, register the best one (or record why there is none). Safe to call any number of times, by anyone:
    `trial_id` is only a hint."""
    from spafit_core.metrics import HIGHER_IS_BETTER

    with db.transaction() as s:
        parent = s.execute(select(Job).where(Job.id == parent_id).with_for_update()).scalar_one()
        if parent.status in JOB_FINAL_STATUSES:
            return
        trials = list(s.scalars(select(Job).where(Job.parent_job_id == parent.id).order_by(Job.created_at)))
        payloads: dict[uuid.UUID, tuple[dict, bytes]] = {}
        unusable: dict[uuid.UUID, str] = {}  # trials whose adapter cannot be read: never picked, never a crash
        recorded = set(s.scalars(select(JobEvent.data["trial_job"].as_string()).where(
            JobEvent.job_id == parent.id, JobEvent.type == "trial")))
        for trial in trials:
            if trial.status not in JOB_FINAL_STATUSES or str(trial.id) in recorded:
                continue
            summary = {"trial_job": str(trial.id), "status": trial.status,
                       **{k: trial.method.get(k) for k in ("n1", "n2", "rank")},
                       "metrics": trial.metrics or {}, "error": trial.error_message}
            if trial.result_sha256:
                payload = _payload(s, trial, payloads, unusable)
                if payload is None:
                    summary["error"] = unusable[trial.id]
                else:
                    summary["trainable_params"] = payload[0]["param_counts"]["total"]
                    summary["stratification"] = payload[0]["stratification"]
            events.append_in(s, parent.id, "trial", summary)
        done = [t for t in trials if t.status in JOB_FINAL_STATUSES]
        parent.progress = {"step": len(done), "total_steps": len(trials)}
        if len(done) < len(trials):
            return

        budget = (parent.method.get("sweep") or {}).get("max_trainable_params")
        board = []
        for t in trials:
            if t.status != "succeeded" or not t.result_sha256:
                continue
            payload = _payload(s, t, payloads, unusable)
            if payload is None:
                continue
            cfg, weights = payload
            main = cfg.get("training", {}).get("main_metric") or next(iter(cfg.get("metrics") or {}), None)
            value = (cfg.get("metrics") or {}).get(main)
            board.append({"trial": t, "cfg": cfg, "weights": weights, "metric": main, "value": value,
                          "params": cfg["param_counts"]["total"]})
        scored = [b for b in board if isinstance(b["value"], int | float) and math.isfinite(b["value"])]
        eligible = [b for b in scored if budget is None or b["params"] <= budget]
        leaderboard = [{"trial_job": str(b["trial"].id), **{k: b["trial"].method.get(k) for k in ("n1", "n2", "rank")},
                        "metric": b["metric"], "value": b["value"], "trainable_params": b["params"],
                        "eligible": b in eligible} for b in board]
        now = utcnow()
        version, refused = None, []
        if eligible and not parent.cancel_requested:
            higher = HIGHER_IS_BETTER.get(eligible[0]["metric"], True)
            for best in sorted(eligible, key=lambda b: ((b["value"] if higher else -b["value"]), -b["params"]),
                               reverse=True):
                try:  # an adapter the registry refuses raised here and rolled the settling back: run for ever
                    with s.begin_nested():
                        version = registry.register_version(s, parent.tenant_id, parent.task_name, best["cfg"],
                                                            best["weights"], job_id=parent.id)
                    break
                except SpafitError as e:
                    refused.append(f"trial {best['trial'].id}: {e.message}")
                    for b in leaderboard:
                        if b["trial_job"] == str(best["trial"].id):
                            b["eligible"], b["error"] = False, e.message
        if parent.cancel_requested:
            parent.status, parent.finished_at = "cancelled", now
            events.append_in(s, parent.id, "status", {"status": "cancelled", "leaderboard": leaderboard})
        elif version is None:
            reason = ("no trial's adapter could be read: " + "; ".join(
                          f"trial {t}: {m}" for t, m in unusable.items())[:2000] if not board and unusable else
                      "no trial succeeded" if not board else
                      "no trial has a finite validation metric to compare" if not scored else
                      f"no trial stayed within the budget of {budget} trainable parameters" if not eligible else
                      "no trial's adapter could be registered: " + "; ".join(refused)[:2000])
            parent.status, parent.finished_at = "failed", now
            parent.error_type, parent.error_message = "sweep-failed", reason
            events.append_in(s, parent.id, "status", {"status": "failed", "error": {
                "type": "sweep-failed", "message": reason}, "leaderboard": leaderboard})
        else:
            parent.status, parent.finished_at = "succeeded", now
            parent.adapter_version_id, parent.metrics = version.id, best["cfg"].get("metrics")
            events.append_in(s, parent.id, "status", {
                "status": "succeeded", "adapter_version": version.version, "best_trial": str(best["trial"].id),
                "best": {k: best["trial"].method.get(k) for k in ("n1", "n2", "rank")},
                "metric": best["metric"], "value": best["value"], "leaderboard": leaderboard})
        shas = {t.result_sha256 for t in trials if t.result_sha256}
        for t in trials:
            t.result_sha256 = None
        s.flush()
        for sha in shas:  # in a savepoint: another tenant storing the same bytes right now once rolled the whole
            blobs.drop_if_unreferenced(s, sha)  # settling back, leaving the sweep running until the requeuer


def _payload(session, trial: Job, payloads: dict, unusable: dict) -> tuple[dict, bytes] | None:
    """The trial's (config, weights), or None (the reason kept in `unusable`) when its archive cannot be read:
    unpacked, it raised out of `settle` on every try, and the sweep ran for ever."""
    from spafit_core.adapter import unpack

    if trial.id not in payloads and trial.id not in unusable:
        try:
            payloads[trial.id] = unpack(blobs.get(session, trial.result_sha256))
        except (SpafitError, AppError) as e:  # refused by the adapter schema; a blob missing or corrupted
            unusable[trial.id] = f"its adapter cannot be used: {e.message}"
    return payloads.get(trial.id)
