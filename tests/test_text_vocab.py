"""Tokenization, vocabulary building, encoding, persistence and batch padding."""

from __future__ import annotations

import json

import pytest
import torch

from captioning.data.text import tokenize
from captioning.data.vocab import END, PAD, START, UNK, Vocabulary, pad_batch

CAPTIONS = [
    "A dog runs on the grass .",
    "A dog, a ball!",
    "The dog's ball is red",
    "a DOG jumps",
    "A cat sleeps .",
]


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A child's  toy-car, (red)!") == ["a", "child", "s", "toy", "car", "red"]
    assert tokenize("snake_case and 3 dogs.") == ["snake", "case", "and", "3", "dogs"]
    assert tokenize("Café Ünïcode") == ["café", "ünïcode"]
    assert tokenize("  ... ") == []
    assert tokenize("") == []


def test_build_counts_and_orders_deterministically():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    # a: 5, dog: 4, ball: 2, the: 2 -> count desc, then word asc
    assert vocab.itos == [PAD, START, END, UNK, "a", "dog", "ball", "the"]
    assert vocab.min_freq == 2
    assert len(vocab) == 8
    assert Vocabulary.build(reversed(CAPTIONS), min_freq=2).itos == vocab.itos


def test_build_min_freq_one_keeps_everything_and_rejects_zero():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    assert "sleeps" in vocab.stoi
    with pytest.raises(ValueError, match="min_freq"):
        Vocabulary.build(CAPTIONS, min_freq=0)


def test_special_ids():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.stoi[w] for w in (PAD, START, END, UNK)] == [0, 1, 2, 3]


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    ids = vocab.encode("A dog, the BALL.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "a dog the ball"
    assert vocab.encode("a zebra", add_special=False) == [vocab.stoi["a"], vocab.unk_id]
    assert vocab.decode_tokens(vocab.encode("a zebra")) == ["a", UNK]


def test_decode_stops_at_end_and_drops_padding():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    a, dog = vocab.stoi["a"], vocab.stoi["dog"]
    assert vocab.decode([1, a, 0, dog, 2, dog, 0]) == "a dog"
    assert vocab.decode(torch.tensor([a, dog])) == "a dog"
    assert vocab.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "captioning-vocab" and data["version"] == 1
    assert data["min_freq"] == 2 and data["itos"] == vocab.itos
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.stoi == vocab.stoi and loaded.min_freq == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a vocabulary file"),
        ('{"format": "other", "version": 1, "itos": []}', "not a vocabulary file"),
        ('{"format": "captioning-vocab", "version": 9, "itos": []}', "version"),
        ('{"format": "captioning-vocab", "version": 1, "itos": ["a", "b"]}', "first entries"),
        (
            (
                '{"format": "captioning-vocab", "version": 1,'
                ' "itos": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}'
            ),
            "duplicate",
        ),
        ('{"format": "captioning-vocab", "version": 1, "itos": "abc"}', "list of strings"),
        (
            (
                '{"format": "captioning-vocab", "version": 1, "min_freq": "5",'
                ' "itos": ["<pad>", "<start>", "<end>", "<unk>"]}'
            ),
            "min_freq",
        ),
    ],
)
def test_load_rejects_corrupted_files(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        Vocabulary.load(path)
    assert str(path) in str(info.value)


def test_pad_batch_shapes_and_values():
    tokens, lengths = pad_batch([[1, 5, 2], [1, 2], [1, 6, 7, 8, 2]])
    assert tokens.shape == (3, 5) and tokens.dtype == torch.long
    assert lengths.tolist() == [3, 2, 5] and lengths.dtype == torch.long
    assert tokens[1].tolist() == [1, 2, 0, 0, 0]
    tokens, _ = pad_batch([[4], [4, 4]], pad_id=9)
    assert tokens.tolist() == [[4, 9], [4, 4]]
    tokens, lengths = pad_batch([])
    assert tokens.shape == (0, 0) and lengths.shape == (0,)
