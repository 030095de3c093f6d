"""Data a classifier can never be registered with is refused when it is validated, not after training."""

from __future__ import annotations

import json

import pytest

from spafit_core import data
from spafit_core.adapter_schema import MAX_LABEL_CHARS, MAX_LABELS


def _report(content: bytes, fmt: str, task_type: str = "single_label_classification"):
    table = data.read_table(content, fmt)
    text_fields, label_field = data.infer_fields(table)
    return data.validate(table, text_fields, label_field, task_type)


def test_more_distinct_labels_than_an_adapter_holds_is_an_error_or_for_numbers_a_warning():
    """Past MAX_LABELS classes a classifier's job fails once trained (the registry refuses its adapter). Labels
    that are words (an id column taken for the label) are an error; numbers are likely scores, which a job may
    still train as regression (the job's task_type decides; jobs.create refuses a classifier of them): a warning."""
    content = b"text,label\n" + b"".join(b"row %d,id%d\n" % (i, i) for i in range(MAX_LABELS + 1))
    report = _report(content, "csv")
    assert not report.ok
    (problem,) = [p for p in report.errors if p.code == "too_many_labels"]
    assert problem.column == "label" and str(MAX_LABELS + 1) in problem.message
    scores = b"text,label\n" + b"".join(b"row %d,%d\n" % (i, i) for i in range(MAX_LABELS + 1))
    report = _report(scores, "csv")
    assert report.ok
    (problem,) = [p for p in report.warnings if p.code == "too_many_labels"]
    assert "task_type regression" in problem.message  # numbers: perhaps scores
    assert _report(scores, "csv", "regression").ok
    at_limit = b"text,label\n" + b"".join(b"row %d,%d\n" % (i, i) for i in range(MAX_LABELS))
    assert _report(at_limit, "csv").ok


@pytest.mark.parametrize("task_type", ["single_label_classification", "multi_label_classification"])
def test_a_label_longer_than_an_adapter_takes_is_an_error_naming_its_line(task_type):
    long = "x" * (MAX_LABEL_CHARS + 1)
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(12)]
    rows[4]["label"] = long
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    report = _report(content, "jsonl", task_type)
    assert [(p.code, p.line, p.column) for p in report.errors] == [("invalid_label", 5, "label")]
    rows[4]["label"] = "x" * MAX_LABEL_CHARS
    assert _report("".join(json.dumps(r) + "\n" for r in rows).encode(), "jsonl", task_type).ok


def test_a_huge_float_label_becomes_a_too_long_label_name():
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(12)] + [{"text": "big", "label": 1e300}]
    report = _report("".join(json.dumps(r) + "\n" for r in rows).encode(), "jsonl")
    assert [(p.code, p.line) for p in report.errors] == [("invalid_label", 13)]
