"""Word-level tokenizer for task text, with a vocabulary built from the training tasks (no download)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return _WORD.findall(text.lower())


class TextTokenizer:
    """Maps text to fixed-length id rows; id 0 is padding, id 1 an unknown word."""

    def __init__(self, vocab: Sequence[str], max_len: int = 16):
        vocab = list(vocab)
        if vocab[:2] != [PAD, UNK]:
            vocab = [PAD, UNK] + [w for w in vocab if w not in (PAD, UNK)]
        self.vocab = vocab
        self.max_len = int(max_len)
        self._ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], max_len: int = 16) -> TextTokenizer:
        """Vocabulary of every word in ``texts``, sorted for reproducibility."""
        words = sorted({w for t in texts for w in split_words(t)})
        return cls(words, max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, max_len) int64 ids, truncated/padded with 0."""
        out = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self._ids.get(w, 1) for w in split_words(text)][: self.max_len]
            out[row, : len(ids)] = ids
        return out
