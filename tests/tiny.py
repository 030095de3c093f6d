"""Tiny randomly initialised encoders (and a matching WordPiece tokenizer) for fast CPU tests."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from types import SimpleNamespace

import torch

WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "a", "is", "was", "not", "very",
         "fine", "plot", "actor", "boring", "fun", "love", "hate", "it", "this", "and", "but", "ok"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS] + [f"w{i}" for i in range(64 - 5 - len(WORDS))]


def tiny_config(arch: str = "bert", layers: int = 4, hidden: int = 32, dropout: float = 0.1):
    from transformers import (
        BertConfig,
        DebertaV2Config,
        DistilBertConfig,
        ElectraConfig,
        RobertaConfig,
        XLMRobertaConfig,
    )

    common = dict(vocab_size=len(VOCAB), max_position_embeddings=64, pad_token_id=0)
    if arch == "distilbert":
        return DistilBertConfig(dim=hidden, n_layers=layers, n_heads=4, hidden_dim=2 * hidden, dropout=dropout,
                                attention_dropout=dropout, **common)
    cls = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig,
           "electra": ElectraConfig, "deberta-v2": DebertaV2Config}[arch]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
              type_vocab_size=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common)
    if arch == "electra":
        kw["embedding_size"] = hidden
    if arch in ("roberta", "xlm-roberta"):
        kw.update(bos_token_id=2, eos_token_id=3, max_position_embeddings=70)
    return cls(**kw)


def make_tiny_model(path: Path, arch: str = "bert", layers: int = 4, hidden: int = 32, seed: int = 0,
                    dropout: float = 0.1) -> Path:
    """Write a randomly initialised `arch` encoder and a BERT WordPiece tokenizer to `path`."""
    from transformers import AutoModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(arch, layers, hidden, dropout))
    model.save_pretrained(path)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(vocab), do_lower_case=True).save_pretrained(path)
    return path


def toy_examples(n: int = 48, seed: int = 0, task_type: str = "single_label_classification", pairs=False):
    """A learnable toy task: label 1 iff the sentence contains a positive word."""
    rng = random.Random(seed)
    pos, neg = ["good", "great", "fine", "fun", "love"], ["bad", "awful", "boring", "hate"]
    filler = [w for w in WORDS if w not in pos + neg]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = rng.sample(filler, rng.randint(2, 6)) + [rng.choice(pos if y else neg)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        if task_type == "regression":
            labels.append(float(y) + rng.random() * 0.1)
        elif task_type == "multi_label_classification":
            labels.append([float(y), float(1 - y), float(len(words) > 4)])
        else:
            labels.append(y)
    text_pairs = [" ".join(rng.sample(filler, 3)) for _ in texts] if pairs else None
    return SimpleNamespace(texts=texts, text_pairs=text_pairs, labels=labels)


def toy_csv(n: int = 48, seed: int = 0, labels=("negative", "positive")) -> bytes:
    """The toy task as a CSV upload (text,label) with string labels."""
    ex = toy_examples(n, seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    for text, y in zip(ex.texts, ex.labels, strict=True):
        w.writerow([text, labels[y]])
    return buf.getvalue().encode()
