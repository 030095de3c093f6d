"""Fairness of the micro-batcher beyond its queues: one tenant's tokenisation cost (huge inputs) does not delay
another tenant's requests, inputs are cut to what their first `max_seq_length` tokens need (the same tokens), and
the deficit round robin costs the same whatever the weights (no empty turns under the lock)."""

from __future__ import annotations

import asyncio
import csv
import statistics
import time
from pathlib import Path

import pytest

from spafit_core.backbone import resolve_model_path
from spafit_core.batching import BATCH_TOKENIZE_CHARS, BatchingConfig, MicroBatcher, cut_input, cut_text
from tests.core.test_batching import _poisoned_forward, assert_same_predictions, weighted_first_passes
from tests.core.test_engine import engine_with_adapters

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), 2)


def _real_texts() -> list[str]:
    """Long texts of real sentences (the sample data, joined), and some built to stress a cut: words of over 100
    characters, runs of punctuation and spaces, newlines, accents, CJK, emoji, control characters."""
    with open(ROOT / "app/sample_data/sentiment_train.csv", newline="") as f:
        sentences = [row["text"] for row in csv.DictReader(f)]
    prose = " ".join(sentences)
    odd = " ".join(f"{s}  {'x' * (101 + i % 7)} ... !!! ¿qué? naïve café 東京タワー 🙂\n\t{s.upper()}\x00\u200b"
                   for i, s in enumerate(sentences))
    return [prose * 3, odd * 2, ("word, " * 5000), "—".join(sentences) * 3]


def _tokenizers(tmp_path):
    """The packaged MiniLM's WordPiece, and a byte-level BPE (RoBERTa's kind) and a SentencePiece-style Unigram
    (Metaspace; XLM-R's, DeBERTa-v3's kind) trained here on the sample data (no network)."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = [line for t in _real_texts() for line in t.split(".")]  # short lines: the Unigram trainer wants them
    out = {"minilm": AutoTokenizer.from_pretrained(resolve_model_path("minilm"))}
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    out["bpe"] = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<unk>")
    uni = SentencePieceUnigramTokenizer()
    uni.train_from_iterator(texts, vocab_size=300, special_tokens=["<pad>", "<unk>"], unk_token="<unk>")
    out["unigram"] = PreTrainedTokenizerFast(tokenizer_object=uni._tokenizer, pad_token="<pad>", unk_token="<unk>")
    return out


def test_cutting_an_input_keeps_its_first_max_length_tokens(tmp_path):
    texts = _real_texts()
    assert min(map(len, texts)) > 20_000
    for name, tok in _tokenizers(tmp_path).items():
        for limit in (32, 128, 512):
            cut = [cut_text(t, limit) for t in texts]
            assert all(len(c) < len(t) for c, t in zip(cut, texts, strict=True))  # something was cut
            assert max(map(len, cut)) < 25 * limit  # about `limit` words, not the whole text
            want = tok(texts, truncation=True, max_length=limit)["input_ids"]
            got = tok(cut, truncation=True, max_length=limit)["input_ids"]
            assert got == want, (name, limit)
            assert all(len(ids) == limit for ids in got)
            # text pairs, truncated longest first: each side keeps enough for the same split
            pairs = [(texts[i], texts[-1 - i][: 50 * (i + 1)]) for i in range(len(texts))]
            pairs += [(texts[-1][:40], texts[0]),  # the long side second
                      (texts[1], f"{'x' * 300} {'y' * 300}")]  # a short side of few words and many tokens
            cut_pairs = [cut_input(p, limit) for p in pairs]
            for kw in ({}, {"truncation": "longest_first"}):
                want = tok([a for a, _ in pairs], [b for _, b in pairs], max_length=limit,
                           **({"truncation": True} | kw))["input_ids"]
                got = tok([a for a, _ in cut_pairs], [b for _, b in cut_pairs], max_length=limit,
                          **({"truncation": True} | kw))["input_ids"]
                assert got == want, (name, limit, "pairs")
    assert cut_input((texts[2], texts[3]), 8) == (cut_text(texts[2], 8), cut_text(texts[3], 8))  # two long: both cut
    assert cut_text("short text", 512) == "short text"
    assert cut_input({"text": "a b c d", "text_pair": None}, 2) == {"text": "a b", "text_pair": None}


def test_a_huge_input_costs_the_tokenizer_about_what_its_first_tokens_do(engine):
    huge = ("good movie, the plot was fine " * 700)[:20_000]
    batcher = MicroBatcher(engine)  # not started: submit only cuts and queues
    fut = batcher.submit("t0", [huge], tenant="a")
    (p,) = batcher._pending
    assert len(p.inputs[0]) < 300 and huge.startswith(p.inputs[0])  # 32 tokens' worth (the adapter's limit)
    fut.cancel()


def test_big_requests_are_tokenised_in_chunks_the_tenants_in_turn(engine, monkeypatch):
    """A tenant with many big requests queued first does not hold another tenant's big request behind them all:
    the lane takes one chunk of each tenant in turn."""
    encode, calls = engine.encode, []

    def recording(adapter, inputs):
        calls.append((adapter.name, len(inputs)))
        return encode(adapter, inputs)

    monkeypatch.setattr(engine, "encode", recording)
    long = " ".join(["great film"] * 200)  # cut to 32 words, about 150 characters
    n = 2 * BATCH_TOKENIZE_CHARS // len(cut_text(long, 32)) + 1  # over the bound after the cut: big
    batcher = MicroBatcher(engine, BatchingConfig(max_queue_per_tenant=4096, max_queue=4096))  # not started
    heavy = [batcher.submit("t0", [long] * n, tenant="a") for _ in range(4)]
    light = batcher.submit("t1", [long] * n, tenant="b")
    assert not batcher._pending and batcher.depths() == {"a": 4 * n, "b": n}  # counted, in the lane
    want = engine.predict("t1", [long] * n)
    calls.clear()
    batcher.start()
    try:
        got = light.result(timeout=60)
        for f in heavy:
            assert len(f.result(timeout=60)) == n
    finally:
        batcher.stop()
    assert_same_predictions(got, want)
    names = [name for name, _ in calls]
    assert all(rows * len(cut_text(long, 32)) <= BATCH_TOKENIZE_CHARS for _, rows in calls)  # chunks
    assert names[:4] == ["t0", "t1", "t0", "t1"]  # turns, not a's 4 requests first
    assert names.index("t1") == 1 and names.count("t1") == 3
    assert batcher.depths() == {}


def test_a_tenant_sending_huge_inputs_does_not_delay_another_tenants_short_requests(engine):
    """Tenant a sends 8 requests of 64 inputs x 20,000 characters (allowed by the defaults); tenant b's short
    requests, measured alone and then during a's flood in this test, stay within a generous factor. Before the
    cut and the lane, a's requests held the 4 submitter threads every request goes through for over a second
    each: b's max went from about 0.1 s to 7-8 s."""
    big = ("lorem ipsum dolor sit amet " * 800)[:20_000]
    batcher = MicroBatcher(engine, BatchingConfig(max_queue_per_tenant=1024)).start()

    async def victim(n: int = 10) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await batcher.predict("t1", ["good movie"], tenant="b")
            out.append(time.perf_counter() - t)
        return out

    async def main():
        await batcher.predict("t1", ["warm up"], tenant="b")
        alone = await victim()
        flood = [asyncio.ensure_future(batcher.predict("t0", [big] * 64, tenant="a")) for _ in range(8)]
        await asyncio.sleep(0.05)
        during = await victim()
        done = await asyncio.gather(*flood)
        return alone, during, done

    try:
        alone, during, done = asyncio.run(main())
    finally:
        batcher.stop()
    assert [len(d) for d in done] == [64] * 8
    assert statistics.median(during) < 10 * statistics.median(alone) + 0.25, (alone, during)
    assert max(during) < 10 * max(alone) + 1.0, (alone, during)


# ------------------------------------------------------------------------------ the round robin with tiny weights
def test_a_tiny_weight_costs_the_round_robin_no_empty_turns(engine, monkeypatch):
    """quantum 1 x weight 0.001 against 30-token rows: 30,000 rounds per row, added in one step, not looped
    (under the batcher's lock)."""
    _poisoned_forward(engine, monkeypatch, poison="unused")
    text = " ".join(["film"] * 28)  # 30 tokens with [CLS] and [SEP]
    assert len(engine.encode(engine.adapter("t0"), [text])[0]["input_ids"]) == 30
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=4, max_wait_ms=1, quantum=1,
                                                  weights={"a": 1e-3, "b": 1e-3}))
    futures = [batcher.submit("t0", [text] * 4, tenant=t) for _ in range(4) for t in "ab"]  # 32 rows
    start = time.process_time()
    batcher.start()
    try:
        for f in futures:
            assert len(f.result(timeout=30)) == 4
    finally:
        batcher.stop()
    assert batcher.served == {"a": 16, "b": 16}
    assert batcher.stats["skipped_rounds"] >= 16 * 30_000 - 64  # 16 rows a tenant, 30,000 rounds each: not looped
    assert batcher.stats["turns"] <= 2 * 32 + 4  # about one turn per row taken
    assert time.process_time() - start < 5.0  # all 32 rows' forwards and tokenising included


def test_tiny_weights_share_the_engine_in_the_same_proportion(engine, monkeypatch):
    first, batcher = weighted_first_passes(engine, monkeypatch, {"heavy": 3e-3, "light": 1e-3})
    assert abs(first.count("t0") - 24) <= 1 and abs(first.count("t1") - 8) <= 1
    assert batcher.stats["turns"] < 200
