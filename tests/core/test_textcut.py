"""A text pair of two long sides is cut before the tokenizer sees it (issue 12): the Rust tokenizers library merges
a pair's overflowing pieces pairwise when truncating, quadratic in the sides' lengths (two 8,000-character sides
at max_length 16 cost it ~1 GB here, two 50,000-character sides ran the process out of memory), so one request
could take the memory every other request needs. Cut, each side keeps its first max_length words: the same
leading tokens, only which side gets the odd token may differ (decided on the cut sides, the same on every path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spafit_core.backbone import resolve_model_path
from spafit_core.batching import cut_input as batching_cut_input
from spafit_core.engine import Engine
from spafit_core.textcut import cut_input, cut_text
from tests.core.test_engine import METHODS, TASKS, random_adapter

ROOT = Path(__file__).resolve().parents[2]

# Tokenise one pair (cut or whole) at max_length 16 in a fresh process, under an address-space limit of what it
# holds after loading plus 2 GiB (so a regression fails there instead of taking this machine's memory), and print
# its CPU seconds and peak-RSS growth.
_PROBE = r"""
import json, resource, sys, time
from transformers import AutoTokenizer
from spafit_core.textcut import cut_input
path, n, cut = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "cut"
tok = AutoTokenizer.from_pretrained(path)
tok(["good movie"] * 2, ["bad film"] * 2, truncation=True, max_length=16)  # start the tokenizer's threads first
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
a = ("good movie, the plot was fine " * (n // 20))[:n]
b = ("bad film and it was boring ok " * (n // 20))[:n]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()
pair = cut_input((a, b), 16) if cut else (a, b)
ids = tok([pair[0]], [pair[1]], truncation=True, max_length=16)["input_ids"][0]
print(json.dumps({"cpu_s": time.process_time() - t0,
                  "rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, "n_ids": len(ids)}))
"""


def _probe(path: str, n: int, cut: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", _PROBE, path, str(n), "cut" if cut else "whole"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_pair_of_two_50k_character_sides_tokenises_in_small_time_and_memory(tiny_dirs):
    path = tiny_dirs("bert")
    cut = _probe(path, 50_000, cut=True)
    assert cut["n_ids"] == 16
    assert cut["cpu_s"] < 2 and cut["rss_mb"] < 200, cut
    # the bound means something: whole, a pair of 8,000-character sides (a sixth of that) costs ~1 GB here and
    # 1.5 CPU s against the cut pair's 0.3 ms. A CI run once saw no RSS growth (2.8 CPU s): either measure counts
    whole = _probe(path, 8_000, cut=False)
    assert whole["rss_mb"] > 200 or whole["cpu_s"] > 100 * max(cut["cpu_s"], 0.001), (whole, cut)


def test_two_long_sides_are_each_cut_to_their_first_max_length_words():
    a, b = "one two three four five six", "seven, eight, nine, ten, eleven"
    assert cut_input((a, b), 3) == ("one two three", "seven, eight, nine,")
    assert cut_input({"text": a, "text_pair": b}, 3) == {"text": "one two three", "text_pair": "seven, eight, nine,"}
    assert cut_input([a, b], 3) == ["one two three", "seven, eight, nine,"]
    assert batching_cut_input is cut_input  # still importable from the batcher
    # a cut of a cut input with a smaller limit is the cut of the input: every path tokenises the same strings
    big = ("good movie, the plot was fine " * 2000, "bad film and it was boring ok " * 2000)
    for m, k in ((512, 32), (64, 16), (32, 32)):
        assert cut_input(cut_input(big, m), k) == cut_input(big, k)
    assert cut_input((a, "short"), 3) == (a, "short")  # one long side: kept longer than the other can be


def test_both_long_pairs_keep_the_same_leading_tokens_but_maybe_the_odd_one():
    """On the packaged MiniLM: each side's tokens are a prefix of its whole-pair tokens, all but the odd one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    prose = "The film was a quiet, careful study of grief; its actors never once overplayed a scene. " * 300
    odd = "naïve café 東京タワー 🙂 ¿qué? x" + "y" * 150 + " !!! ... " * 3
    sides = [prose, odd * 200, "word, " * 5000, "—".join(["a b c"] * 4000)]
    for limit, n in ((8, 700), (16, 1500), (128, 1500)):
        for x in sides:
            for y in sides:
                # Small enough for the whole pair's quadratic merge (its cost grows as (length / limit)^2: at 8
                # tokens, 700 characters a side), long enough that the cut keeps a small part of each side.
                pair = (x[:n], y[:n + 300])
                a, b = cut_input(pair, limit)
                want = tok(pair[0], pair[1], truncation=True, max_length=limit, return_token_type_ids=True)
                got = tok(a, b, truncation=True, max_length=limit, return_token_type_ids=True)
                assert len(got["input_ids"]) == len(want["input_ids"]) == limit
                g1, w1 = _first(got), _first(want)
                g2, w2 = _second(got), _second(want)
                assert abs(len(g1) - len(w1)) <= 1 and len(g1) + len(g2) == len(w1) + len(w2)
                for g, w in ((g1, w1), (g2, w2)):
                    k = min(len(g), len(w))
                    assert g[:k] == w[:k], (limit, pair[0][:30], pair[1][:30])


def _first(enc) -> list[int]:  # the first side's ids ([CLS] a [SEP] b [SEP])
    return [i for i, t in zip(enc["input_ids"][1:], enc["token_type_ids"][1:], strict=True) if t == 0][:-1]


def _second(enc) -> list[int]:
    return [i for i, t in zip(enc["input_ids"], enc["token_type_ids"], strict=True) if t == 1][:-1]


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    path = tiny_dirs("bert")
    e = Engine(device="cpu", default_base_model=path)
    _, cfg, w = random_adapter(path, METHODS[0], TASKS[0], seed=0)
    e.load("t0", cfg, w)
    return e


def test_engine_encode_tokenises_the_cut_pair(engine):
    """Every path goes through `Engine.encode`: it cuts, so the odd token goes by the cut sides here (the first
    side is longer whole, the second once cut), on lone, batched, fan-out and batch-job runs alike."""
    adapter = engine.adapter("t0")
    a, b = "good " * 700, "good, " * 300  # whole: 700 tokens vs 600; cut: 1 a word vs 2 (the comma)
    (feats,) = engine.encode(adapter, [(a, b)])
    limit = len(feats["input_ids"])
    tok = engine._backbone_of(adapter).tokenizer
    want = tok(*cut_input((a, b), limit), truncation=True, max_length=limit)
    whole = tok(a, b, truncation=True, max_length=limit)
    assert feats["input_ids"] == want["input_ids"] != whole["input_ids"]
    assert sum(feats["token_type_ids"]) == sum(whole["token_type_ids"]) + 1  # the second side got the odd token
    assert cut_text(a, limit) == "good " * (limit - 1) + "good"
