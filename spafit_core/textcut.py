"""Inputs cut before tokenising to what their first `max_tokens` tokens need, so a 20,000-character input costs
the tokenizer what a `max_tokens`-word one does, and the tokens a caller gets are the same as for the whole input
(one documented exception: which side of a pair of two long sides gets the odd token, `cut_input`).

Used by the batcher on submit and by `Engine.encode` on every path (lone, batched, fan-out, batch jobs), so every
path tokenises the same cut inputs. A module of its own (nothing of ours imported) so both can use it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.forward import Input

_WORD = re.compile(r"[^ ]+")  # split on ASCII space only: every tokenizer (WordPiece, BPE, SentencePiece) splits there
_ALNUM = re.compile(r"[^\W_]")  # a letter or digit: never removed by a normalizer, so its word yields >= 1 token


def _head(text: str, max_tokens: int) -> str | None:
    """`text` up to the end of its `max_tokens`-th word that holds a letter or digit, or None if it has fewer."""
    if len(text) < max_tokens:  # fewer characters than words asked for
        return None
    n = 0
    for m in _WORD.finditer(text):
        if _ALNUM.search(m.group()):
            n += 1
            if n >= max_tokens:
                return text[: m.end()]
    return None


def cut_text(text: str, max_tokens: int) -> str:
    """`text` cut after its first `max_tokens` words that hold a letter or a digit (words split on spaces), or
    whole if it has fewer: the first `max_tokens` tokens are the same. Tokenizers split words at spaces and
    tokenise each word on its own (a pre-token never spans a space), and a word with a letter or digit yields at
    least one token (WordPiece gives a word over `max_input_chars_per_word` one [UNK]), so those words hold at
    least `max_tokens` tokens, all complete. Costs about `max_tokens` regex matches whatever the text's length."""
    head = _head(text, max_tokens)
    return text if head is None else head


def cut_input(x: Input, max_tokens: int) -> Input:
    """`x` (a text, a {"text", "text_pair"} dict or a pair) with only what its first `max_tokens` tokens need.

    A pair is truncated longest first, so which side is longer matters too. When only one side is long (at least
    `max_tokens` words), it is cut but kept longer than the other side's tokens can be (at most two a UTF-8 byte,
    with SentencePiece's word marks): the tokens are exactly the whole pair's. When both sides are long, each is
    cut after its first `max_tokens` words: each still holds >= `max_tokens` tokens, so truncation keeps the
    floor/ceil halves of the same leading tokens, and the tokenizer never sees two long sides (the Rust library
    merges a pair's overflowing pieces pairwise, quadratic in the sides' lengths: two 50,000-character sides at
    max_length 16 ran out of memory). The one deviation: which side gets the odd token (the longer one) is decided
    on the cut sides' token counts, so it can differ from the whole texts' by that one token; deterministic, and the
    same on every path (the cut of a cut input with a smaller `max_tokens` is the cut of the input)."""
    if isinstance(x, str):
        return cut_text(x, max_tokens)
    if isinstance(x, dict):
        text, pair = x.get("text"), x.get("text_pair")
    else:
        text, pair = x[0], x[1]
    if not isinstance(text, str):
        return x
    if not isinstance(pair, str):  # a single text
        cut = cut_text(text, max_tokens)
        return x if cut is text else ({**x, "text": cut} if isinstance(x, dict) else type(x)([cut, *x[1:]]))
    ha, hb = _head(text, max_tokens), _head(pair, max_tokens)
    if ha is not None and hb is not None:  # both long: each side its first max_tokens words
        a, b = ha, hb
    else:
        a, b = _cut_side(text, pair, max_tokens), _cut_side(pair, text, max_tokens)
    if a is text and b is pair:
        return x
    if isinstance(x, dict):
        return {**x, "text": a, "text_pair": b}
    return type(x)([a, b, *x[2:]])


def _cut_side(text: str, other: str, max_tokens: int) -> str:
    """One side of a pair cut, still holding more tokens than `other` can have."""
    if len(cut_text(text, max_tokens)) == len(text):
        return text
    return cut_text(text, max(max_tokens, 2 * len(other.encode()) + 2))
