"""Reading, field inference, validation and example conversion of labelled text data."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spafit_core.config import TaskSpec
from spafit_core.data import (
    MAX_PROBLEMS_PER_CODE,
    DataReport,
    Table,
    detect_format,
    infer_fields,
    label_names,
    load_hf_dataset,
    load_table,
    read_table,
    to_examples,
    validate,
)
from spafit_core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
GLUE_DIR = Path(__file__).parent / "fixtures" / "glue"
SAMPLE = ROOT / "app" / "sample_data"
SINGLE = "single_label_classification"
MULTI = "multi_label_classification"
REGRESSION = "regression"


def csv_bytes(text: str) -> bytes:
    return text.encode("utf-8")


# ------------------------------------------------------------------------------------------- read_table


def test_csv_records_keep_their_source_lines_across_blank_lines_and_multiline_fields():
    data = csv_bytes('text,label\ngood film,pos\n\n"two\nlines",neg\nlast one,pos\n')
    t = read_table(data, "csv")
    assert t.format == "csv"
    assert t.columns == ["text", "label"]
    assert t.records == [{"text": "good film", "label": "pos"}, {"text": "two\nlines", "label": "neg"},
                         {"text": "last one", "label": "pos"}]
    assert t.lines == [2, 4, 6]
    assert t.truncated_rows == 0


def test_csv_accepts_a_utf8_bom_crlf_and_strips_header_names():
    t = read_table(b"\xef\xbb\xbftext , label\r\nh\xc3\xa9llo,1\r\n")
    assert t.columns == ["text", "label"]
    assert t.records == [{"text": "héllo", "label": "1"}]


def test_tsv_keeps_quote_characters_as_text():
    t = read_table(csv_bytes('sentence\tlabel\nthe "greatest" film\t1\n"unclosed\t0\n'), "tsv")
    assert [r["sentence"] for r in t.records] == ['the "greatest" film', '"unclosed']
    assert t.lines == [2, 3]


@pytest.mark.parametrize("line, message", [
    ('{"text": "good \\ud800 x", "label": "negative"}', "line 2: a text holds a lone surrogate"),
    ('{"text": "fine", "label": NaN}', "line 2: NaN is not JSON"),
    ('{"text": "fine", "label": -Infinity}', "line 2: -Infinity is not JSON"),
])
def test_jsonl_refuses_what_json_does_not_have(line, message):
    """Python's json reads NaN and lone surrogate escapes; a dataset holding them would be stored as ready and
    then fail every job (the tokenizer refuses a surrogate), so the upload names the line instead."""
    with pytest.raises(DataError, match=message):
        read_table(csv_bytes('{"text": "ok \\u00e9", "label": "positive"}\n' + line + "\n"), "jsonl")


def test_jsonl_columns_are_the_union_in_order_of_first_appearance():
    data = csv_bytes('{"text": "a", "label": 1}\n\n{"label": 0, "text": "b", "extra": [1, 2]}\n{"text": "c"}\n')
    t = read_table(data, "jsonl")
    assert t.columns == ["text", "label", "extra"]
    assert t.records == [{"text": "a", "label": 1, "extra": None}, {"label": 0, "text": "b", "extra": [1, 2]},
                         {"text": "c", "label": None, "extra": None}]
    assert t.lines == [1, 3, 4]


@pytest.mark.parametrize(("data", "fmt", "message"), [
    (b"", "csv", "the file is empty"),
    (b"\n\n", "jsonl", "the file is empty"),
    (b"text,label\n", "csv", "the file has a header but no data rows"),
    (b"text,label\nok,1\nbad \xe9t\xe9,0\n", "csv", r"line 3: not valid UTF-8 \(byte 0xe9 at position 5\)"),
    ("text,label\nok,1\n".encode("utf-16"), "csv", "the file is UTF-16 encoded; save it as UTF-8"),
    (b'text,label\nok,1\n"never closed,0\nmore,1\n', "csv",
     "line 3: a quoted field starts here but its closing quote is never found"),
    (b'text,label\n"quoted"tail,1\n', "csv", "line 2: a closing quote must be followed by the delimiter"),
    (b"text,label\nok,1\nthree,fields,here\n", "csv", r"line 3: expected 2 fields \(text, label\), found 3"),
    (b"text\tlabel\nok\t1\nno label\n", "tsv", r"line 3: expected 2 fields \(text, label\), found 1"),
    (b'text,label\n"a\nb",x,1\n', "csv", r"line 2: expected 2 fields .* found 3 \(the record runs to line 3"),
    (b'text,label\n"a\nb\nc,1\n"x",2\n', "csv", "line 5: a closing quote .* the record starts on line 2"),
    (b"text,text\na,b\n", "csv", "line 1: duplicate column name\\(s\\) 'text'"),
    (b"text,,label\na,b,c\n", "csv", "line 1: header column 2 has no name"),
    (b'{"text": "a"}\n  {"text": "b",}\n', "jsonl",
     "line 2: invalid JSON at column 16: Expecting property name enclosed in double quotes"),
    (b'{"text": "a"}\n\n["b", 1]\n', "jsonl", r"line 3: expected a JSON object \{...\}, got a list$"),
    (b'[{"text": "a"},\n{"text": "b"}]\n', "jsonl", "line 1: invalid JSON .*JSON Lines needs one object per line"),
    (b'{"text": "a", "text": "b"}\n', "jsonl", "line 1: duplicate key 'text'"),
    (b'{"text": ' + b"[" * 100_000 + b"\n", "jsonl", "line 1: invalid JSON"),
])
def test_unreadable_files_raise_data_error_naming_the_line(data, fmt, message):
    with pytest.raises(DataError, match=message):
        read_table(data, fmt)


def test_max_rows_keeps_the_first_rows_and_counts_the_rest_without_parsing_them():
    body = "".join(f"row {i},{i % 2}\n" for i in range(10))
    t = read_table(csv_bytes("text,label\n" + body + "a,b,c,d\n"), "csv", max_rows=4)
    assert [r["text"] for r in t.records] == ["row 0", "row 1", "row 2", "row 3"]
    assert t.lines == [2, 3, 4, 5]
    assert t.truncated_rows == 7  # rows 4..9 and the malformed last one
    j = read_table(csv_bytes('{"a": 1}\n{"a": 2}\n\n{"a": 3}\nnot json\n'), "jsonl", max_rows=1)
    assert j.records == [{"a": 1}] and j.truncated_rows == 3


def test_read_table_from_a_path_detects_the_format_by_extension(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
    (tmp_path / "d.tsv").write_text("text\tlabel\na,b\tx\n", encoding="utf-8")
    assert read_table(tmp_path / "d.jsonl").format == "jsonl"
    assert read_table(str(tmp_path / "d.tsv")).records == [{"text": "a,b", "label": "x"}]
    with pytest.raises(DataError, match="no such file: .*missing.csv"):
        read_table(tmp_path / "missing.csv")


def test_bad_arguments_are_rejected():
    with pytest.raises(DataError, match="unknown format 'xlsx'"):
        read_table(b"a\n1\n", "xlsx")
    with pytest.raises(ConfigError, match="max_rows"):
        read_table(b"a\n1\n", "csv", max_rows=0)


@pytest.mark.parametrize(("name", "head", "fmt"), [
    ("train.csv", b"whatever", "csv"),
    ("train.TSV", b"a,b", "tsv"),
    ("x.ndjson", b"", "jsonl"),
    ("x.json", b'{"a": 1}', "jsonl"),
    (None, b'\xef\xbb\xbf  {"text": "a"}', "jsonl"),
    (None, b"text\tlabel\nhello, world\t1\n", "tsv"),
    (None, b"text,label\nhello\tworld,1\n", "csv"),
    ("upload.txt", b"a;b\n", "csv"),
])
def test_detect_format(name, head, fmt):
    assert detect_format(name, head) == fmt


def test_detect_format_of_nothing_is_an_error():
    with pytest.raises(DataError, match="empty"):
        detect_format(None, b"  \n")


# ------------------------------------------------------------------------------------------- fields and labels


@pytest.mark.parametrize(("columns", "texts", "label"), [
    (["text", "label"], ["text"], "label"),
    (["idx", "sentence1", "sentence2", "label"], ["sentence1", "sentence2"], "label"),
    (["question", "sentence", "label"], ["question", "sentence"], "label"),
    (["sentence", "label"], ["sentence"], "label"),
    (["text", "text_pair", "score"], ["text", "text_pair"], "score"),
    (["premise", "hypothesis", "labels"], ["premise", "hypothesis"], "labels"),
    (["Text", "Label"], ["Text"], "Label"),
    (["review", "rating"], ["review"], "rating"),
    (["body", "class"], ["body"], "class"),
    (["only_label"], ["only_label"], None),
])
def test_infer_fields_from_column_names(columns, texts, label):
    assert infer_fields(columns) == (texts, label)


def test_infer_fields_skips_numeric_columns_when_given_a_table():
    t = read_table(csv_bytes("id,stars,review,target\n1,5,great,1\n2,1,awful,0\n"), "csv")
    assert infer_fields(t) == (["review"], "target")
    assert infer_fields(t, "stars", "target") == (["stars"], "target")


def test_label_names_sorts_integers_numerically_then_names():
    t = read_table(csv_bytes("text,label\na,10\nb,2\nc,1\nd,2\n"), "csv")
    assert label_names(t, "label", SINGLE) == ["1", "2", "10"]
    mixed = Table("jsonl", ["label"], [{"label": "neg"}, {"label": 1.0}, {"label": 0}, {"label": "Pos"},
                                       {"label": None}], [1, 2, 3, 4, 5])
    assert label_names(mixed, "label", SINGLE) == ["0", "1", "Pos", "neg"]
    assert label_names(t, "label", REGRESSION) == []


def test_label_names_of_multi_label_data_is_the_union():
    t = read_table(csv_bytes("text,labels\na,sports|politics\nb,\nc, tech | sports\n"), "csv")
    assert label_names(t, "labels", MULTI) == ["politics", "sports", "tech"]
    j = read_table(csv_bytes('{"text": "a", "labels": ["b", "a"]}\n{"text": "b", "labels": []}\n'), "jsonl")
    assert label_names(j, "labels", MULTI) == ["a", "b"]


# ------------------------------------------------------------------------------------------- validate


def codes(report: DataReport) -> list[tuple[str, int | None, str | None, str]]:
    return [(p.code, p.line, p.column, p.severity) for p in report.problems]


def test_a_clean_dataset_has_no_problems():
    rows = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12))
    t = read_table(csv_bytes("text,label\n" + rows), "csv")
    report = validate(t, ["text"], "label", SINGLE)
    assert report.ok and report.problems == []
    assert report.rows == 12 and report.label_counts == {"neg": 6, "pos": 6}
    assert report.to_dict() == {"format": "csv", "rows": 12, "columns": ["text", "label"], "text_fields": ["text"],
                                "label_field": "label", "label_counts": {"neg": 6, "pos": 6}, "problems": [],
                                "truncated_rows": 0, "ok": True}


def test_missing_columns_are_reported_with_the_columns_present():
    t = read_table(csv_bytes("review,stars\ngood,5\n"), "csv")
    report = validate(t, ["text"], "label", SINGLE)
    assert not report.ok
    assert [p.message for p in report.errors] == [
        "text column 'text' not found (columns present: review, stars)",
        "label column 'label' not found (columns present: review, stars)"]
    assert [p.column for p in report.errors] == ["text", "label"]
    none = validate(t, [], None, SINGLE)
    assert [p.code for p in none.errors] == ["missing_column", "missing_column"]
    assert "name one with text_fields" in none.errors[0].message


def test_empty_texts_and_missing_labels_name_their_lines():
    data = 'text,label\nfine,pos\n"",neg\n"multi\nline",\n   ,pos\nok,neg\n'
    report = validate(read_table(csv_bytes(data), "csv"), ["text"], "label", SINGLE)
    assert codes(report)[:3] == [("empty_text", 3, "text", "error"), ("empty_text", 6, "text", "error"),
                                 ("missing_label", 4, "label", "error")]
    assert report.errors[0].message == "line 3: empty text in column 'text'"
    assert report.label_counts == {"neg": 2, "pos": 2}


def test_regression_labels_must_be_finite_numbers():
    data = "text,score\na,0.5\nb,high\nc,\nd,nan\ne,3\n" + "".join(f"x{i},{i}\n" for i in range(6))
    report = validate(read_table(csv_bytes(data), "csv"), ["text"], "score", REGRESSION)
    assert codes(report) == [("invalid_label", 3, "score", "error"), ("missing_label", 4, "score", "error"),
                             ("invalid_label", 5, "score", "error")]
    assert report.errors[0].message == ("line 3: label 'high' in column 'score' is not a finite number "
                                        "(regression)")
    assert report.label_counts == {}


def test_labels_unseen_in_training_are_errors_in_validation_data():
    train = read_table(csv_bytes("text,label\na,pos\nb,neg\n"), "csv")
    dev = read_table(csv_bytes("text,label\nc,pos\nd,neutral\ne,neg\n"), "csv")
    report = validate(dev, ["text"], "label", SINGLE, train_labels=label_names(train, "label", SINGLE))
    assert [(p.code, p.line) for p in report.errors] == [("unknown_label", 3)]
    assert report.errors[0].message == ("line 3: label 'neutral' does not occur in the training data "
                                        "(training labels: neg, pos)")


def test_a_single_class_and_a_tiny_dataset_are_warnings_only():
    report = validate(read_table(csv_bytes("text,label\na,pos\nb,pos\n"), "csv"), ["text"], "label", SINGLE)
    assert report.ok
    assert codes(report) == [("single_class", None, "label", "warning"), ("too_few_rows", None, None, "warning")]


def test_truncation_is_a_warning_in_the_report():
    rows = "".join(f"t{i},{i % 2}\n" for i in range(30))
    report = validate(read_table(csv_bytes("text,label\n" + rows), "csv", max_rows=20), ["text"], "label", SINGLE)
    assert report.ok and report.rows == 20 and report.truncated_rows == 10
    assert report.warnings[-1].message == "only the first 20 rows were read; 10 more were ignored"


def test_many_problems_of_one_kind_are_capped_and_summed_up():
    rows = "".join(f",{i % 2}\n" for i in range(MAX_PROBLEMS_PER_CODE + 7))
    report = validate(read_table(csv_bytes("text,label\n" + rows), "csv"), ["text"], "label", SINGLE)
    empty = [p for p in report.problems if p.code == "empty_text"]
    assert len(empty) == MAX_PROBLEMS_PER_CODE + 1
    assert empty[-1].line is None and empty[-1].message == "... and 7 more lines with empty text in column 'text'"


def test_multi_label_cells_must_be_lists_or_pipe_separated():
    data = ('{"text": "a", "labels": ["x", "y"]}\n{"text": "b", "labels": 3}\n{"text": "c", "labels": []}\n'
            '{"text": "d"}\n{"text": 5, "labels": "x|z"}\n')
    report = validate(read_table(csv_bytes(data), "jsonl"), ["text"], "labels", MULTI)
    assert codes(report)[:3] == [("invalid_text", 5, "text", "error"), ("invalid_label", 2, "labels", "error"),
                                 ("missing_label", 4, "labels", "error")]
    assert report.label_counts == {"x": 2, "y": 1, "z": 1}


def test_a_list_in_a_single_label_column_hints_at_multi_label():
    t = read_table(csv_bytes('{"text": "a", "label": ["x"]}\n'), "jsonl")
    [problem] = validate(t, ["text"], "label", SINGLE).errors
    assert problem.line == 1 and "multi_label_classification" in problem.message


def test_raise_for_errors_lists_the_errors():
    report = validate(read_table(csv_bytes("text,label\n,a\nb,\n"), "csv"), ["text"], "label", SINGLE)
    with pytest.raises(DataError, match="2 error\\(s\\): line 2: empty text in column 'text'; line 3: no value") as e:
        report.raise_for_errors()
    assert e.value.detail["ok"] is False


# ------------------------------------------------------------------------------------------- to_examples


def test_to_examples_maps_labels_through_the_task_label_order():
    t = read_table(csv_bytes("text,label\ngreat,positive\nawful,negative\nfine, positive\n"), "csv")
    ex = to_examples(t, ["text"], "label", TaskSpec(SINGLE, ("positive", "negative")))
    assert ex.texts == ["great", "awful", "fine"] and ex.text_pairs is None
    assert ex.labels == [0, 1, 0]


def test_to_examples_for_pairs_regression_and_multi_label():
    pairs = read_table(csv_bytes("sentence1,sentence2,score\na,b,0.5\nc,d,4\n"), "csv")
    ex = to_examples(pairs, ["sentence1", "sentence2"], "score", TaskSpec(REGRESSION))
    assert (ex.texts, ex.text_pairs, ex.labels) == (["a", "c"], ["b", "d"], [0.5, 4.0])
    multi = read_table(csv_bytes('{"text": "a", "labels": ["z", "x"]}\n{"text": "b", "labels": "y"}\n'), "jsonl")
    ex = to_examples(multi, ["text"], "labels", TaskSpec(MULTI, ("x", "y", "z")))
    assert ex.labels == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    unlabelled = to_examples(multi, ["text"], None, TaskSpec(MULTI, ("x", "y", "z")))
    assert unlabelled.labels == [] and len(unlabelled) == 2


def test_to_examples_raises_on_a_label_the_task_does_not_know():
    t = read_table(csv_bytes("text,label\na,pos\nb,meh\n"), "csv")
    with pytest.raises(DataError, match=r"line 3: label 'meh' is not one of the task's labels \(pos, neg\)"):
        to_examples(t, ["text"], "label", TaskSpec(SINGLE, ("pos", "neg")))


# ------------------------------------------------------------------------------------------- load_table


def test_load_table_reads_files_and_glue_presets(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1\n", encoding="utf-8")
    assert load_table(str(path)).records == [{"text": "a", "label": "1"}]
    assert load_table("d.csv", data_dir=tmp_path).records == [{"text": "a", "label": "1"}]
    rte = load_table("glue/rte", "validation", data_dir=GLUE_DIR)
    assert rte.columns == ["sentence1", "sentence2", "label", "idx"] and len(rte) == 2


def test_load_hf_dataset_from_a_saved_folder_decodes_class_labels(tmp_path):
    import datasets
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=["x", "y"]))})
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, -1], "tags": [[0, 1], [], [1]]},
                                    features=features)
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "ds"))
    t = load_table(str(tmp_path / "ds"), "train")
    assert t.format == "hf" and t.lines == [1, 2, 3]
    assert t.records == [{"text": "a", "label": "pos", "tags": ["x", "y"]}, {"text": "b", "label": "neg", "tags": []},
                         {"text": "c", "label": None, "tags": ["y"]}]
    assert validate(t, ["text"], "label", SINGLE).errors[0].message == "row 3: no value in label column 'label'"
    assert load_hf_dataset(str(tmp_path / "ds"), "train", max_rows=2).truncated_rows == 1
    with pytest.raises(DataError, match="has no split 'test'; it has train, validation"):
        load_hf_dataset(str(tmp_path / "ds"), "test")


# ------------------------------------------------------------------------------------------- sample data


def test_the_packaged_sample_data_is_clean_balanced_and_disjoint():
    train = read_table(SAMPLE / "sentiment_train.csv")
    dev = read_table(SAMPLE / "sentiment_validation.csv")
    fields = infer_fields(train)
    assert fields == (["text"], "label")
    train_report = validate(train, *fields, SINGLE)
    dev_report = validate(dev, *fields, SINGLE, train_labels=label_names(train, "label", SINGLE))
    assert train_report.problems == [] and dev_report.problems == []
    assert train_report.label_counts == {"negative": 80, "positive": 80}
    assert dev_report.label_counts == {"negative": 20, "positive": 20}
    train_texts = {r["text"] for r in train.records}
    assert len(train_texts) == 160
    assert not train_texts & {r["text"] for r in dev.records}


# ------------------------------------------------------------------------------------------- import hygiene


@pytest.mark.parametrize("module", ["data", "glue", "metrics"])
def test_module_imports_no_torch_or_web_stack_at_module_level(module):
    tree = ast.parse((ROOT / "spafit_core" / f"{module}.py").read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:  # module level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add((node.module or "").split(".")[0])
    assert not top & {"torch", "transformers", "datasets", "fastapi", "sqlalchemy", "celery", "sklearn", "scipy"}


# ------------------------------------------------------------------------------------------- properties

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOISY = st.text(alphabet=st.sampled_from(list('ab ,;"\'\t\n\r{}[]:\\é\x00') + ["\u2028", "😀"]), max_size=60)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252", "shift_jis"])
FORMATS = st.sampled_from([None, "csv", "tsv", "jsonl"])


def read_or_data_error(data: bytes, fmt: str | None) -> Table | None:
    try:
        return read_table(data, fmt)
    except DataError:
        return None


@FAST
@given(st.binary(max_size=300), FORMATS)
def test_random_bytes_raise_nothing_but_data_error(data, fmt):
    read_or_data_error(data, fmt)


@FAST
@given(NOISY, ENCODINGS, FORMATS, st.integers(min_value=1, max_value=3))
def test_random_text_in_any_encoding_raises_nothing_but_data_error(text, encoding, fmt, max_rows):
    data = text.encode(encoding, errors="replace")
    read_or_data_error(data, fmt)
    try:
        read_table(data, fmt, max_rows=max_rows)
    except DataError:
        pass


CELL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8).map(str.strip).filter(bool)


@st.composite
def tables(draw, cell=CELL, name=NAME):
    columns = draw(st.lists(name, min_size=1, max_size=4, unique=True))
    rows = draw(st.lists(st.lists(cell, min_size=len(columns), max_size=len(columns)), min_size=1, max_size=6))
    return columns, rows


@FAST
@given(tables())
def test_csv_round_trips_with_exact_line_numbers(table):
    columns, rows = table
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    expected_lines, line = [], 1 + out.getvalue().count("\n")
    for row in rows:
        before = out.getvalue().count("\n")
        writer.writerow(row)
        expected_lines.append(line)
        line += out.getvalue().count("\n") - before
    t = read_table(out.getvalue().encode("utf-8"), "csv")
    assert t.columns == columns
    assert t.records == [dict(zip(columns, row, strict=True)) for row in rows]
    assert t.lines == expected_lines


TSV_CELL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), max_size=12)
TSV_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\t"), min_size=1,
                   max_size=8).map(str.strip).filter(bool)


@FAST
@given(tables(TSV_CELL, TSV_NAME))
def test_tsv_round_trips(table):
    columns, rows = table
    rows = [r for r in rows if any(r)] or [["x"] * len(columns)]  # an all-empty one-column row is a blank line
    text = "\n".join("\t".join(r) for r in [columns, *rows]) + "\n"
    t = read_table(text.encode("utf-8"), "tsv")
    assert t.columns == columns
    assert t.records == [dict(zip(columns, row, strict=True)) for row in rows]
    assert t.lines == list(range(2, len(rows) + 2))


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | CELL, lambda inner: st.lists(inner, max_size=3), max_leaves=5)


@FAST
@given(st.lists(st.dictionaries(NAME, JSON_VALUE, max_size=4), min_size=1, max_size=6))
def test_jsonl_round_trips(records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    t = read_table(text.encode("utf-8"), "jsonl")
    columns = list(dict.fromkeys(k for r in records for k in r))
    assert t.columns == columns
    assert t.records == [{c: r.get(c) for c in columns} for r in records]
    assert t.lines == list(range(1, len(records) + 1))
