"""Word vocabulary with special tokens, JSON persistence and batch padding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioning.core.files import atomic_write_json, read_json
from captioning.data.text import tokenize

PAD = "<pad>"
START = "<start>"
END = "<end>"
UNK = "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)  # the ids of SPECIALS, fixed by the format
VOCAB_FORMAT = "captioning-vocab"
VOCAB_VERSION = 1


@dataclass
class Vocabulary:
    """Index ↔ word mapping; ``itos[0:4]`` are ``<pad> <start> <end> <unk>``."""

    itos: list[str]
    min_freq: int = 1
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.itos = list(self.itos)
        problem = _check_itos(self.itos)
        if problem:
            raise ValueError(f"invalid vocabulary: {problem}")
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> Vocabulary:
        """Build from captions, keeping words seen at least ``min_freq`` times.

        Pass the training split's captions only, so dev/test words stay unknown.
        Order is deterministic: count descending, then word ascending.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)
        )
        return cls(itos=[*SPECIALS, *kept], min_freq=min_freq)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; unknown words map to ``<unk>``."""
        ids = [self.stoi.get(w, self.unk_id) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Words of ``ids``, stopping at ``<end>`` and dropping ``<start>``/``<pad>``.

        ``<unk>`` is kept as the word ``"<unk>"``; an id outside the vocabulary is a ValueError.
        """
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.itos)})")
            words.append(self.itos[i])
        return words

    def decode(self, ids: Sequence[int]) -> str:
        """Space-joined words of ``ids`` (see :meth:`decode_tokens`)."""
        return " ".join(self.decode_tokens(ids))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary atomically as JSON."""
        atomic_write_json(
            path,
            {
                "format": VOCAB_FORMAT,
                "version": VOCAB_VERSION,
                "min_freq": self.min_freq,
                "itos": self.itos,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`; ``ValueError`` if it is invalid."""
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path}: not a vocabulary file (expected format {VOCAB_FORMAT!r})")
        if data.get("version") != VOCAB_VERSION:
            raise ValueError(f"{path}: unsupported vocabulary version {data.get('version')!r}")
        itos, min_freq = data.get("itos"), data.get("min_freq", 1)
        problem = _check_itos(itos)
        if problem is None and (type(min_freq) is not int or min_freq < 1):
            problem = f"min_freq must be a positive integer, got {min_freq!r}"
        if problem:
            raise ValueError(f"{path}: invalid vocabulary: {problem}")
        return cls(itos=itos, min_freq=min_freq)


def _check_itos(itos: object) -> str | None:
    """Describe what is wrong with ``itos``, or return None."""
    if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
        return "itos must be a list of strings"
    if tuple(itos[: len(SPECIALS)]) != SPECIALS:
        return f"the first entries must be {list(SPECIALS)}, got {itos[: len(SPECIALS)]}"
    if len(set(itos)) != len(itos):
        dupes = sorted(w for w, c in Counter(itos).items() if c > 1)
        return f"duplicate words: {dupes[:10]}"
    return None


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Pad to the longest sequence: ``(tokens [B, T], lengths [B])``, both int64."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    longest = int(lengths.max()) if len(seqs) else 0
    tokens = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            tokens[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return tokens, lengths
