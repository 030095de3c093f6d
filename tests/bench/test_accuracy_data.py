"""The accuracy benchmark's data handling (benchmarks/accuracy.py), without training: the pandas-style TSV
reader for the drug reviews, the stratified hold-out, the GLUE path on the core's fixtures, the refusal of
data that is not the published file, and the summary table's arithmetic."""

from __future__ import annotations

import io
import os
import statistics
import zipfile
from pathlib import Path

import pytest

_omp = os.environ.get("OMP_WAIT_POLICY")
from benchmarks import accuracy  # noqa: E402

if _omp is None:  # the benchmark sets it for its own run; the processes later tests start keep the default
    os.environ.pop("OMP_WAIT_POLICY", None)

GLUE = Path(__file__).resolve().parents[1] / "core" / "fixtures" / "glue"

# What pandas' to_csv(sep="\t") writes: an unnamed index column, quoted fields, one spanning two lines.
PANDAS_TSV = (
    b'\tdrugName\treview\trating\n'
    b'0\tA\t"""Great &#039;stuff&#039;"""\tpositive\n'
    b'1\tB\t"""Made me\nvery ill"""\tnegative\n'
    b'2\tC\t"""ok"""\tneutral\n'
)


def test_pandas_tsv_rows_keep_their_fields_and_starting_lines():
    table = accuracy.read_pandas_tsv(PANDAS_TSV, "t.tsv")
    assert table.columns == ["id", "drugName", "review", "rating"]
    assert [r["rating"] for r in table.records] == ["positive", "negative", "neutral"]
    assert table.lines == [2, 3, 5]  # the second review spans lines 3-4
    assert accuracy.clean_review(table.records[0]["review"]) == "Great 'stuff'"
    assert accuracy.clean_review(table.records[1]["review"]) == "Made me very ill"


def test_a_row_with_a_missing_field_stops_with_its_line():
    with pytest.raises(SystemExit, match="t.tsv line 3: expected 4 fields, found 3"):
        accuracy.read_pandas_tsv(PANDAS_TSV.replace(b"\tnegative\n", b"\n"), "t.tsv")


def test_stratified_split_holds_out_each_label_in_proportion_and_is_deterministic():
    records = [{"label": "a"} for _ in range(50)] + [{"label": "b"} for _ in range(10)] + [{"label": "c"}]
    table = accuracy.Table("csv", ["label"], records, list(range(2, 63)))
    rest, held = accuracy.stratified_split(table, "label", 0.2, seed=0)
    assert accuracy.label_counts(held, "label") == {"a": 10, "b": 2}  # a lone row is never held out
    assert accuracy.label_counts(rest, "label") == {"a": 40, "b": 8, "c": 1}
    assert sorted(rest.lines + held.lines) == table.lines
    again = accuracy.stratified_split(table, "label", 0.2, seed=0)[1]
    assert again.lines == held.lines
    assert accuracy.stratified_split(table, "label", 0.2, seed=1)[1].lines != held.lines


def test_glue_tasks_load_from_tsv_files_with_their_preset_metrics():
    mrpc = accuracy.load_glue_task(GLUE, "mrpc", None, None)
    accuracy.check(mrpc)
    assert mrpc.metrics[0] == "f1" and "accuracy" in mrpc.metrics
    assert len(mrpc.text_fields) == 2
    stsb = accuracy.load_glue_task(GLUE, "stsb", None, None)
    accuracy.check(stsb)
    assert stsb.task.task_type == "regression" and stsb.metrics[0] == "pearson"


def test_a_zip_that_is_not_the_published_file_is_refused(tmp_path):
    fake = io.BytesIO()
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("drugsComTrain.tsv", PANDAS_TSV)
        z.writestr("drugsComTest.tsv", PANDAS_TSV)
    path = tmp_path / "drugsCom.zip"
    path.write_bytes(fake.getvalue())
    with pytest.raises(SystemExit, match="refusing to benchmark on different data"):
        accuracy.drugreview_zip(path, tmp_path)


def _run(label: str, method: str, seed: int, f1: float, seconds: float) -> dict:
    return {"label": label, "method": method, "n1": 2, "n2": 4, "layer_groups": [1, 1, 2, 2, 3, 3], "seed": seed,
            "params": {"total": 10, "without_head": 7, "head": 3, "base_model": 997}, "adapter_bytes": 100, "best_epoch": 1,
            "test": {"macro_f1": f1, "accuracy": f1 + 0.1}, "validation": {"macro_f1": f1, "accuracy": f1},
            "train_seconds": seconds, "cpu_seconds": seconds}


def test_summary_is_the_mean_and_sample_spread_over_seeds_in_method_order():
    runs = [_run("lora", "lora", s, f, 10.0 + s) for s, f in enumerate((0.4, 0.5, 0.6))]
    runs += [_run("spafit (2,4)", "spafit", s, f, 5.0) for s, f in enumerate((0.45, 0.55))]
    rows = accuracy.summarise(runs, ["macro_f1", "accuracy"])
    assert [r["label"] for r in rows] == ["spafit (2,4)", "lora"]
    lora = rows[1]
    assert lora["seeds"] == [0, 1, 2]
    assert lora["test_macro_f1"] == pytest.approx((0.5, statistics.stdev([0.4, 0.5, 0.6])))
    assert lora["train_seconds"] == pytest.approx((11.0, 1.0))
    table = accuracy.markdown({"dataset": {"metrics": ["macro_f1", "accuracy"]}, "summary": rows, "floors": {},
                               "machine": {"summary": "CPU"}})
    assert "| lora | — | 112233 | 10 | 1.00 % | 7 | 0.500 ± 0.100 | 0.600 ± 0.100 |" in table
    assert "Mean ± sample std over 2/3 seeds" in table
