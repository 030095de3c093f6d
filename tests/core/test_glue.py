"""GLUE presets and loading the original GLUE TSV files (tiny copies in fixtures/glue, real column layouts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spafit_core.config import TaskSpec
from spafit_core.data import to_examples, validate
from spafit_core.errors import ConfigError, DataError
from spafit_core.glue import GLUE_TASKS, get_glue_task, load_glue

GLUE_DIR = Path(__file__).parent / "fixtures" / "glue"

# (task, split, columns, first record's texts, labels of every row, first line)
CASES = [
    ("cola", "train", ["sentence", "label", "idx"],
     ["Our friends won't buy this analysis, let alone the next one we propose."],
     ["acceptable", "acceptable", "unacceptable", "unacceptable"], 1),  # no header: data starts on line 1
    ("cola", "validation", ["sentence", "label", "idx"], ["The sailors rode the breeze clear of the rocks."],
     ["acceptable", "unacceptable"], 1),
    ("sst2", "train", ["sentence", "label", "idx"], ["hide new secretions from the parental units "],
     ["negative", "negative", "positive", "positive"], 2),
    ("sst2", "validation", ["sentence", "label", "idx"], ["it 's a charming and often affecting journey . "],
     ["positive", "negative"], 2),
    ("mrpc", "train", ["sentence1", "sentence2", "label", "idx"],
     ['Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
      'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his '
      'evidence .'], ["equivalent", "not_equivalent", "equivalent"], 2),
    ("mrpc", "validation", ["sentence1", "sentence2", "label", "idx"],
     ["He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
      '" The foodservice pie business does not fit our long-term growth strategy .'],
     ["equivalent", "not_equivalent"], 2),
    ("stsb", "train", ["sentence1", "sentence2", "label", "idx"],
     ["A plane is taking off.", "An air plane is taking off."], [5.0, 3.8, 3.8, 0.4], 2),
    ("stsb", "validation", ["sentence1", "sentence2", "label", "idx"],
     ["A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."], [5.0, 4.75], 2),
    ("qqp", "train", ["question1", "question2", "label", "idx"],
     ["How is the life of a math student? Could you describe your own experiences?",
      "Which level of prepration is enough for the exam jlpt5?"], ["not_duplicate", "duplicate", "not_duplicate"], 2),
    ("qqp", "validation", ["question1", "question2", "label", "idx"],
     ["Why are African-Americans so beautiful?", "Why are hispanics so beautiful?"],
     ["not_duplicate", "not_duplicate", "duplicate"], 2),
    ("mnli", "train", ["premise", "hypothesis", "label", "idx"],
     ["Conceptually cream skimming has two basic dimensions - product and geography.",
      "Product and geography are what make cream skimming work. "],
     ["neutral", "entailment", "entailment", "contradiction"], 2),
    ("mnli", "validation_matched", ["premise", "hypothesis", "label", "idx"],
     ["The new rights are nice enough", "Everyone really likes the newest benefits "],
     ["neutral", "contradiction"], 2),
    ("mnli", "validation_mismatched", ["premise", "hypothesis", "label", "idx"],
     ["Your contribution helped make it possible for us to provide our students with a quality education.",
      "Your contributions were of no help with our students' education."],
     ["contradiction", "contradiction", "entailment"], 2),
    ("qnli", "train", ["question", "sentence", "label", "idx"],
     ["When did the third Digimon series begin?",
      "Unlike the two seasons before it and most of the seasons that followed, Digimon Tamers takes a darker and "
      "more realistic approach to its story featuring Digimon who do not reincarnate after their deaths and more "
      "complex character development in the original Japanese."],
     ["not_entailment", "not_entailment", "entailment"], 2),
    ("qnli", "validation", ["question", "sentence", "label", "idx"],
     ["What came into force after the new constitution was herald?",
      "As of that day, the new constitution heralding the Second Republic came into force."],
     ["entailment", "not_entailment"], 2),
    ("rte", "train", ["sentence1", "sentence2", "label", "idx"],
     ["No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq."],
     ["not_entailment", "entailment", "entailment"], 2),
    ("rte", "validation", ["sentence1", "sentence2", "label", "idx"],
     ["Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
      "Christopher Reeve Foundation.", "Christopher Reeve had an accident."], ["not_entailment", "entailment"], 2),
    ("wnli", "train", ["sentence1", "sentence2", "label", "idx"],
     ["I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole."],
     ["entailment", "entailment", "entailment", "not_entailment"], 2),
    ("wnli", "validation", ["sentence1", "sentence2", "label", "idx"],
     ["The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned."],
     ["not_entailment", "entailment"], 2),
]


@pytest.mark.parametrize(("name", "split", "columns", "texts", "labels", "first_line"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_each_glue_task_loads_its_tsv_layout(name, split, columns, texts, labels, first_line):
    task = GLUE_TASKS[name]
    t = load_glue(name, split, data_dir=GLUE_DIR)
    assert t.format == "tsv"
    assert t.columns == columns
    assert [t.records[0][f] for f in task.text_fields] == texts
    assert [r["label"] for r in t.records] == labels
    assert [r["idx"] for r in t.records] == list(range(len(labels)))
    assert t.lines == list(range(first_line, first_line + len(labels)))
    report = validate(t, list(task.text_fields), task.label_field, task.task_type, train_labels=list(task.labels)
                      or None)
    assert report.errors == []


def test_the_nine_presets():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    metrics = {name: t.metrics for name, t in GLUE_TASKS.items()}
    assert metrics == {"cola": ("matthews_corrcoef",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
                       "stsb": ("pearson", "spearman"), "qqp": ("f1", "accuracy"), "mnli": ("accuracy",),
                       "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",)}
    assert GLUE_TASKS["mrpc"].main_metric == "f1"
    assert GLUE_TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["mrpc"].labels[1] == "equivalent"  # f1's positive class is label index 1
    assert GLUE_TASKS["qqp"].labels[1] == "duplicate"
    assert GLUE_TASKS["wnli"].labels == ("not_entailment", "entailment")
    stsb = GLUE_TASKS["stsb"]
    assert (stsb.task_type, stsb.labels, stsb.task_spec) == ("regression", (), TaskSpec("regression"))
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["rte"].validation_splits == ("validation",)
    assert {(t.hub_id, t.hub_config) for t in GLUE_TASKS.values()} == {("nyu-mll/glue", n) for n in GLUE_TASKS}


@pytest.mark.parametrize("name", ["mrpc", "glue/mrpc", "MRPC", "GLUE/MRPC", " mrpc "])
def test_get_glue_task_accepts_common_spellings(name):
    assert get_glue_task(name) is GLUE_TASKS["mrpc"]


def test_get_glue_task_accepts_the_folder_names():
    assert get_glue_task("SST-2").name == "sst2" and get_glue_task("STS-B").name == "stsb"


def test_an_unknown_task_lists_the_nine():
    with pytest.raises(ConfigError, match="unknown GLUE task 'boolq'; expected one of cola, sst2, mrpc, stsb, qqp, "
                                          "mnli, qnli, rte, wnli"):
        get_glue_task("boolq")


def test_split_names_and_aliases():
    assert load_glue("mnli", "dev_mismatched", GLUE_DIR).records[2]["label"] == "entailment"
    assert len(load_glue("rte", "dev", GLUE_DIR)) == 2
    with pytest.raises(DataError, match="MNLI has validation_matched and validation_mismatched"):
        load_glue("mnli", "validation", GLUE_DIR)
    with pytest.raises(DataError, match="GLUE sst2 has no split 'holdout'"):
        load_glue("sst2", "holdout", GLUE_DIR)


def test_test_splits_have_no_label_column():
    cola = load_glue("cola", "test", GLUE_DIR)  # CoLA's test file, unlike train/dev, has a header
    assert cola.columns == ["sentence", "idx"] and cola.lines == [2, 3]
    assert cola.records[0] == {"sentence": "Bill whistled past the house.", "idx": 0}
    assert load_glue("stsb", "test", GLUE_DIR).columns == ["sentence1", "sentence2", "idx"]
    assert load_glue("mrpc", "test", GLUE_DIR).records[0]["sentence2"].startswith("Current Chief Operating")


def test_glue_labels_map_to_the_hub_order():
    task = GLUE_TASKS["mnli"]
    t = load_glue("mnli", "train", GLUE_DIR)
    ex = to_examples(t, list(task.text_fields), task.label_field, task.task_spec)
    assert ex.labels == [1, 0, 0, 2]  # neutral, entailment, entailment, contradiction
    assert ex.text_pairs is not None and len(ex.text_pairs) == 4


def test_a_flat_folder_with_a_bom_works(tmp_path):
    source = (GLUE_DIR / "MRPC" / "train.tsv").read_bytes()
    (tmp_path / "train.tsv").write_bytes(b"\xef\xbb\xbf" + source)
    t = load_glue("mrpc", "train", data_dir=tmp_path)
    assert len(t) == 3 and t.records[1]["label"] == "not_equivalent"


def test_the_task_folder_is_matched_loosely(tmp_path):
    shutil.copytree(GLUE_DIR / "SST-2", tmp_path / "sst2")
    assert len(load_glue("glue/sst2", "train", tmp_path)) == 4


def test_missing_file_names_both_layouts(tmp_path):
    with pytest.raises(DataError, match=r"no dev.tsv for GLUE qnli under .*: expected .*QNLI/dev.tsv or .*/dev.tsv"):
        load_glue("qnli", "validation", data_dir=tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_glue("qnli", "validation", data_dir=tmp_path / "nope")


@pytest.mark.parametrize(("task", "content", "message"), [
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n",
     r"train.tsv line 3: label 'maybe' is not a GLUE rte label \(expected entailment, not_entailment\)"),
    ("wnli", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t2\n",
     r"train.tsv line 2: label '2' is not a GLUE wnli label \(expected 0..1\)"),
    ("stsb", "index\tsentence1\tsentence2\tscore\n0\ta\tb\tfive\n", "train.tsv line 2: score 'five' is not a number"),
    ("qnli", "index\tquestion\tsentence\tlabel\n0\tq\n", "train.tsv line 2: expected at least 4 tab-separated "
     "fields, found 2"),
    ("mrpc", "sentence\tlabel\nx\t1\n", r"not a GLUE mrpc file: no column\(s\) #1 String, #2 String, Quality"),
])
def test_malformed_glue_files_name_file_and_line(tmp_path, task, content, message):
    (tmp_path / "train.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_glue(task, "train", tmp_path)


def test_hub_loading_decodes_class_labels_and_keeps_the_preset_columns(monkeypatch):
    import datasets
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                                  "idx": datasets.Value("int32")})
    fake = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [1], "idx": [0]},
                                      features=features)
    calls = []

    class Builder:  # what `datasets.load_dataset_builder` gives: resolved files inside the repo, a streamed split
        base_path = "hf://datasets/nyu-mll/glue@main"
        config = type("Config", (), {"data_files": {"train": [f"{base_path}/mrpc/train-00000.parquet"]}})()

        def as_streaming_dataset(self, split):
            calls.append(("split", split))
            return fake

    import spafit_core.data_hub as hub_mod
    monkeypatch.setattr(hub_mod, "_read_card", lambda *a, **k: None)  # no network for the dataset card
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: calls.append((a, k)) or Builder())
    t = load_glue("mrpc", "train")
    assert calls == [(("nyu-mll/glue", "mrpc"), {"token": None}), ("split", "train")]
    assert t.format == "hf" and t.columns == ["sentence1", "sentence2", "label", "idx"]
    assert t.records == [{"sentence1": "a", "sentence2": "b", "label": "equivalent", "idx": 0}]


def test_hub_loading_offline_says_to_pass_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises without network
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub .* pass data_dir=<folder holding "
                                        "MNLI/dev_matched.tsv>") as e:
        load_glue("mnli", "validation_matched")
    assert e.value.field == "data_dir"
