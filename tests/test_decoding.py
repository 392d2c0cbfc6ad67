"""Greedy and beam-search decoding: the standard beam search, n-gram blocking, the stop rule."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import MAX_BEAM, DecodeConfig, beam_search, decode, greedy_decode

A, B, C, D, E = 4, 5, 6, 7, 8  # word ids after the four specials


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


class TableDecoder:
    """A fake decoder: the next word's log-probs depend only on the last word (``table[last]``)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [V, V] log-probs of the next word given the last one
        self.steps = 0

    def context(self, feats):
        return {"feats": feats}

    def init_state(self, ctx):
        return (torch.zeros(ctx["feats"].shape[0], 1),)

    @staticmethod
    def select(ctx, idx):
        return {k: v.index_select(0, idx) for k, v in ctx.items()}

    def step(self, ctx, state, word):
        self.steps += 1
        return self.table[word].clone(), state, None


def make_table(probs: dict[int, dict[int, float]], vocab_size: int) -> torch.Tensor:
    """Rows {last word: {next word: probability}}; unlisted pairs are impossible."""
    table = torch.full((vocab_size, vocab_size), -1e4)
    for last, row in probs.items():
        assert math.isclose(sum(row.values()), 1.0), last
        for nxt, prob in row.items():
            table[last, nxt] = math.log(prob)
    return table


def random_table(seed: int, vocab_size: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab_size, vocab_size, generator=g) * 2).log_softmax(-1)


def caption_logprob(table: torch.Tensor, words: list[int]) -> float:
    seq = [START_ID, *words, END_ID]
    return sum(float(table[a, b]) for a, b in zip(seq, seq[1:], strict=False))


def best_normalised_caption(table: torch.Tensor, max_len: int, alpha: float) -> list[int]:
    """Exhaustive search over every caption of 1..max_len words."""
    rows, words = table.tolist(), range(UNK_ID + 1, table.shape[0])
    best, best_score = None, -math.inf
    for n in range(1, max_len + 1):
        for caption in itertools.product(words, repeat=n):
            seq = (START_ID, *caption, END_ID)
            lp = sum(rows[a][b] for a, b in zip(seq, seq[1:], strict=False))
            if lp / (n + 1) ** alpha > best_score:
                best, best_score = list(caption), lp / (n + 1) ** alpha
    return best


# "a" is likely first and may end at once; "b d" starts less likely but every word after is sure.
# A beam search where finished captions keep their slot and pruning uses the raw log-prob returns
# [a] here (score -0.477) at beam 2, alpha 1, max_len 5: at step 1 "a <end>" and "a c" fill both
# slots and "b d" is pruned. Its normalised score, -0.436, is the best of all captions.
SHORT_WINS_TABLE = make_table(
    {
        START_ID: {A: 0.7, B: 0.3},
        A: {END_ID: 0.55, C: 0.45},
        B: {D: 0.95, END_ID: 0.05},
        C: {END_ID: 0.3, A: 0.7},
        D: {END_ID: 0.95, B: 0.05},
        **{i: {END_ID: 1.0} for i in (PAD_ID, END_ID, UNK_ID, E)},
    },
    vocab_size=9,
)


def test_longer_caption_with_the_best_normalised_score_wins():
    cfg = DecodeConfig(beam_size=2, max_len=5, length_alpha=1.0)
    best, *rest = beam_search(TableDecoder(SHORT_WINS_TABLE), torch.zeros(1, 1), cfg)[0]
    assert best.tokens == [B, D] and best.finished
    assert best.logprob == pytest.approx(math.log(0.3 * 0.95 * 0.95), abs=1e-5)
    assert best.score == pytest.approx(best.logprob / 3, abs=1e-5)
    assert [h.tokens for h in rest] == [[A]]  # the short caption is only second
    assert best.tokens == best_normalised_caption(SHORT_WINS_TABLE, max_len=5, alpha=1.0)
    # the raw log-prob (alpha 0) prefers the short caption, as it should
    raw = beam_search(TableDecoder(SHORT_WINS_TABLE), torch.zeros(1, 1), DecodeConfig(2, 5))
    assert raw[0][0].tokens == [A]


def reference_beam_search(table, cfg: DecodeConfig) -> list[tuple[list[int], float, float]]:
    """The algorithm written plainly, one hypothesis at a time, always run to max_len."""
    k, vocab = cfg.beam_size, table.shape[0]
    n = cfg.no_repeat_ngram

    def allowed(words: tuple, w: int, t: int) -> bool:
        if t == cfg.max_len:
            return w == END_ID
        if w in (PAD_ID, START_ID) or (cfg.block_unk and w == UNK_ID):
            return False
        if w == END_ID:
            return t >= cfg.min_len
        if n and len(words) >= n:
            gram = (*words[len(words) - n + 1 :], w)
            grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
            return gram not in grams
        return True

    live, pool = [((), 0.0)], []
    for t in range(cfg.max_len + 1):
        cands = []
        for words, lp in live:
            last = words[-1] if words else START_ID
            for w in range(vocab):
                if allowed(words, w, t):
                    cands.append((lp + float(table[last, w]), words, w))
        cands.sort(key=lambda c: -c[0])
        live = []
        for rank, (lp, words, w) in enumerate(cands[: 2 * k]):
            if w == END_ID:
                if rank < k:
                    pool.append((list(words), lp, lp / (len(words) + 1) ** cfg.length_alpha))
            elif len(live) < k:
                live.append(((*words, w), lp))
        pool = sorted(pool, key=lambda h: -h[2])[: min(k, cfg.n_best)]
    return pool


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "beam,alpha,ngram", [(2, 0.0, 0), (3, 0.5, 0), (5, 1.0, 0), (3, 0.0, 2), (4, 0.7, 1)]
)
def test_beam_search_matches_the_plain_reference(seed, beam, alpha, ngram):
    table = random_table(seed)
    cfg = DecodeConfig(beam, max_len=6, length_alpha=alpha, n_best=4, no_repeat_ngram=ngram)
    got = beam_search(TableDecoder(table), torch.zeros(1, 1), cfg)[0]
    want = reference_beam_search(table, cfg)
    assert [h.tokens for h in got] == [w for w, _, _ in want]
    for h, (words, lp, score) in zip(got, want, strict=True):
        assert h.logprob == pytest.approx(lp, abs=1e-4)
        assert h.score == pytest.approx(score, abs=1e-4)
        assert h.logprob == pytest.approx(caption_logprob(table, words), abs=1e-4)


def test_the_search_stops_once_no_live_hypothesis_can_win():
    # every caption ends after "a" or "a b"; the loops on c/d are far less likely
    table = make_table(
        {
            START_ID: {A: 0.9, C: 0.1},
            A: {END_ID: 0.6, B: 0.4},
            B: {END_ID: 0.9, C: 0.1},
            C: {D: 0.5, C: 0.5},
            D: {C: 0.5, D: 0.5},
            **{i: {END_ID: 1.0} for i in (PAD_ID, END_ID, UNK_ID, E)},
        },
        vocab_size=9,
    )
    cfg = DecodeConfig(beam_size=2, max_len=15, n_best=2)
    early, full = TableDecoder(table), TableDecoder(table)
    got = beam_search(early, torch.zeros(1, 1), cfg)[0]
    ref = beam_search(full, torch.zeros(1, 1), cfg, stop_early=False)[0]
    assert early.steps <= 4 and full.steps == cfg.max_len + 1
    assert [(h.tokens, h.logprob, h.score) for h in got] == [
        (h.tokens, h.logprob, h.score) for h in ref
    ]
    assert [h.tokens for h in got] == [[A], [A, B]]


# ---------------------------------------------------------------- real (random) decoders

VOCAB = 30
FEAT = {"inject": 40, "merge": 40, "attention": 24, "updown": 24}


def random_decoder(kind: str, seed: int = 0):
    """A random decoder with peaked outputs (ties are unlikely); it loops, as untrained ones do."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        kind=kind,
        vocab_size=VOCAB,
        feat_dim=FEAT[kind],
        embed_dim=16,
        hidden_dim=32,
        attn_dim=16,
        merge_dim=32,
        dropout=0.0,
    )
    model = build_decoder(cfg)
    with torch.no_grad():
        model.out.weight.mul_(6.0)
        model.out.bias[END_ID] += 1.0  # captions end at many lengths
    return model.eval()


def random_feats(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 9, FEAT[kind]) if kind in ATTENDS else (n, FEAT[kind])
    return torch.randn(*shape, generator=g)


KINDS = ("inject", "merge", "attention", "updown")
ATTENDS = ("attention", "updown")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ngram", [0, 2, 3])
def test_beam_one_equals_greedy(kind, ngram):
    model, feats = random_decoder(kind), random_feats(kind, 12)
    cfg = DecodeConfig(beam_size=1, max_len=15, no_repeat_ngram=ngram)
    greedy = greedy_decode(model, feats, cfg)
    via_decode = decode(model, feats, cfg)
    forced = beam_search(model, feats, cfg)  # the beam code path with k=1
    for g, d, f in zip(greedy, via_decode, forced, strict=True):
        assert g.tokens == d[0].tokens == f[0].tokens
        assert g.logprob == pytest.approx(f[0].logprob, abs=1e-4)
        if kind in ATTENDS:
            torch.testing.assert_close(g.attention, f[0].attention)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beam,alpha,ngram", [(3, 0.0, 0), (4, 0.5, 3), (1, 0.0, 2)])
def test_a_batch_equals_the_images_one_by_one(kind, beam, alpha, ngram):
    model, feats = random_decoder(kind, seed=2), random_feats(kind, 7)
    cfg = DecodeConfig(beam, max_len=12, length_alpha=alpha, no_repeat_ngram=ngram)
    batch = decode(model, feats, cfg)
    for i, nbest in enumerate(batch):
        alone = decode(model, feats[i : i + 1], cfg)[0]
        assert [h.tokens for h in nbest] == [h.tokens for h in alone]
        for h, a in zip(nbest, alone, strict=True):
            assert h.score == pytest.approx(a.score, abs=1e-4)
            if kind in ATTENDS:
                torch.testing.assert_close(h.attention, a.attention, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_early_stop_returns_what_running_to_max_len_returns(kind, alpha):
    model, feats = random_decoder(kind, seed=3), random_feats(kind, 10)
    cfg = DecodeConfig(beam_size=4, max_len=14, length_alpha=alpha, n_best=4)
    early = beam_search(model, feats, cfg)
    full = beam_search(model, feats, cfg, stop_early=False)
    for a, b in zip(early, full, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,ngram", [(0.0, 0), (0.5, 3)])
def test_a_pool_of_one_gives_the_same_best_caption_in_fewer_steps(kind, alpha, ngram):
    """``n_best=1`` (what evaluation and plain-text captioning ask for) stops once no live
    hypothesis can beat the best finished one: the same best caption, never more steps
    (shipped resnet50-attention, beam 3, 200 dev photos: 13.6 steps a photo instead of 15.0)."""
    model, feats = random_decoder(kind, seed=4), random_feats(kind, 12)
    steps = {}

    def counting(label):
        def step(ctx, state, word):
            steps[label] = steps.get(label, 0) + 1
            return model.step(ctx, state, word)

        return step

    pools = {}
    for n_best in (4, 1):
        cfg = DecodeConfig(beam_size=4, max_len=14, length_alpha=alpha, n_best=n_best,
                           no_repeat_ngram=ngram)  # fmt: skip
        wrapped = copy.copy(model)
        wrapped.step = counting(n_best)
        pools[n_best] = beam_search(wrapped, feats, cfg)
    for many, one in zip(pools[4], pools[1], strict=True):
        assert len(one) == 1 and one[0].tokens == many[0].tokens
        assert one[0].score == pytest.approx(many[0].score, abs=1e-5)
    assert steps[1] <= steps[4]


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


LOOP_TABLE = make_table(  # "a b a b ..." unless blocked; <end> is unlikely everywhere
    {
        START_ID: {A: 0.9, C: 0.1},
        A: {B: 0.8, C: 0.12, END_ID: 0.08},
        B: {A: 0.8, D: 0.1, END_ID: 0.1},
        C: {A: 0.5, D: 0.3, END_ID: 0.2},
        D: {E: 0.5, C: 0.3, END_ID: 0.2},
        E: {A: 0.5, END_ID: 0.5},
        **{i: {END_ID: 1.0} for i in (PAD_ID, END_ID, UNK_ID)},
    },
    vocab_size=9,
)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeated_ngram_when_blocking_is_on(n):
    feats = torch.zeros(2, 1)
    loops = greedy_decode(TableDecoder(LOOP_TABLE), feats, DecodeConfig(1, max_len=10))[0]
    assert loops.tokens == [A, B] * 5  # without blocking it loops to max_len
    for k in (1, 3):
        cfg = DecodeConfig(k, max_len=10, no_repeat_ngram=n)
        for nbest in decode(TableDecoder(LOOP_TABLE), feats, cfg):
            assert nbest
            for h in nbest:
                assert len(set(ngrams(h.tokens, n))) == len(ngrams(h.tokens, n)), h.tokens
    best = decode(TableDecoder(LOOP_TABLE), feats, DecodeConfig(1, 10, no_repeat_ngram=2))[0][0]
    # after "a b a", "a b" is taken: "a c"; after "c a", "a b" and "a c" are taken: <end>
    assert best.tokens == [A, B, A, C, A]


@pytest.mark.parametrize("kind", KINDS)
def test_no_repeated_ngram_on_decoders_that_loop(kind):
    model, feats = random_decoder(kind), random_feats(kind, 12)
    plain = decode(model, feats, DecodeConfig(3, max_len=15))
    assert any(len(set(ngrams(h.tokens, 2))) < len(ngrams(h.tokens, 2)) for nb in plain for h in nb)
    for beam in (1, 3):
        for nbest in decode(model, feats, DecodeConfig(beam, max_len=15, no_repeat_ngram=2)):
            for h in nbest:
                assert len(set(ngrams(h.tokens, 2))) == len(ngrams(h.tokens, 2))


# ---------------------------------------------------------------- n-best lists and limits


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_nbest_and_scores(kind):
    model, feats = random_decoder(kind), random_feats(kind, 8)
    res = beam_search(model, feats, DecodeConfig(beam_size=4, n_best=4, length_alpha=0.5))
    for nbest in res:
        assert len(nbest) == 4  # the beam never narrows, so four captions finish
        scores = [h.score for h in nbest]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in nbest}) == len(nbest)
        for h in nbest:
            assert h.finished and h.score == pytest.approx(h.logprob / (len(h.tokens) + 1) ** 0.5)
            if kind in ATTENDS:
                assert h.attention.shape == (len(h.tokens), 9)
                torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)))
            else:
                assert h.attention is None
    short = beam_search(model, feats, DecodeConfig(beam_size=4, n_best=2))
    assert all(len(nb) == 2 for nb in short)
    assert len(beam_search(model, feats, DecodeConfig(beam_size=2, n_best=5))[0]) == 2


def test_beams_that_never_end_are_closed_at_max_len():
    table = make_table({i: {A: 0.99, END_ID: 0.01} for i in range(9)}, vocab_size=9)
    for k in (1, 3):  # alpha 1: the longest caption has the best score
        cfg = DecodeConfig(k, max_len=4, length_alpha=1.0)
        for nbest in decode(TableDecoder(table), torch.zeros(2, 1), cfg):
            assert all(len(h.tokens) <= 4 for h in nbest)
            assert nbest[0].tokens == [A] * 4 and nbest[0].finished
            assert nbest[0].logprob == pytest.approx(4 * math.log(0.99) + math.log(0.01), abs=1e-4)


def test_unk_is_blocked_and_min_len():
    model = random_decoder("merge")
    with torch.no_grad():
        model.out.bias[UNK_ID] = 100.0  # make <unk> overwhelmingly likely
        model.out.bias[END_ID] = 50.0  # and <end> next
    feats = random_feats("merge", 2)
    for k in (1, 2):
        for nbest in decode(model, feats, DecodeConfig(beam_size=k, min_len=3)):
            assert UNK_ID not in nbest[0].tokens and len(nbest[0].tokens) == 3
    allowed = greedy_decode(model, feats, DecodeConfig(beam_size=1, block_unk=False))
    assert allowed[0].tokens[0] == UNK_ID


@pytest.mark.parametrize("kind", KINDS)
def test_min_len_zero_allows_an_empty_caption(kind):
    model, feats = random_decoder(kind), random_feats(kind, 3)
    with torch.no_grad():
        model.out.bias[END_ID] = 100.0  # <end> at once
    for k in (1, 3):
        for nbest in decode(model, feats, DecodeConfig(beam_size=k, min_len=0)):
            assert nbest[0].tokens == [] and nbest[0].finished
            if kind in ATTENDS:
                assert nbest[0].attention.shape == (0, 9)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("beam_size", 0, r"beam_size must be an integer 1\.\.10, got 0"),
        ("beam_size", -3, "beam_size"),
        ("beam_size", MAX_BEAM + 1, "beam_size"),
        ("beam_size", 2.5, "beam_size"),
        ("max_len", 0, r"max_len must be an integer >= 1"),
        ("min_len", -1, "min_len"),
        ("min_len", 21, r"min_len must be an integer 0\.\.20"),
        ("n_best", 0, "n_best"),
        ("no_repeat_ngram", -1, "no_repeat_ngram"),
        ("no_repeat_ngram", True, "no_repeat_ngram"),
        ("length_alpha", -0.5, "length_alpha must be a number >= 0"),
        ("length_alpha", float("nan"), "length_alpha"),
        ("length_alpha", "0.5", "length_alpha"),
        ("block_unk", "no", "block_unk"),
    ],
)
def test_invalid_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**{field: value})


def test_settings_in_range_and_old_bundle_defaults_load():
    assert DecodeConfig(beam_size=MAX_BEAM, min_len=0, length_alpha=0).beam_size == MAX_BEAM
    old = {  # decode_defaults as bundles wrote them before no_repeat_ngram existed
        "beam_size": 5,
        "max_len": 20,
        "min_len": 1,
        "length_alpha": 0.5,
        "block_unk": True,
        "n_best": 5,
    }
    assert DecodeConfig(**old).no_repeat_ngram == 0


# -- prompted captions: a forced prefix ----------------------------------------------------------


def forced_start(table: torch.Tensor, word: int) -> torch.Tensor:
    """``table`` where the first word after <start> is always ``word``."""
    out = table.clone()
    out[START_ID] = -1e4
    out[START_ID, word] = 0.0
    return out


@pytest.mark.parametrize("prefix", [[], [C, A]])
@pytest.mark.parametrize("beam", [1, 3])
def test_prefix_starts_every_caption_and_its_word_logprobs_sum_to_the_caption(beam, prefix):
    table = random_table(7)
    cfg = DecodeConfig(beam_size=beam, max_len=6, n_best=beam)
    for nbest in decode(TableDecoder(table), torch.zeros(4, 1), cfg, prefix=prefix):
        for hyp in nbest:
            assert hyp.tokens[: len(prefix)] == prefix
            seq = [START_ID, *hyp.tokens, END_ID]
            expected = [float(table[a, b]) for a, b in zip(seq, seq[1:], strict=False)]
            assert hyp.token_logprobs == pytest.approx(expected, abs=1e-4)
            assert hyp.logprob == pytest.approx(caption_logprob(table, hyp.tokens), abs=1e-4)


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_prefix_search_equals_the_free_search_of_a_model_that_must_start_so(beam):
    # with raw log-probs (alpha 0) forcing the first word only shifts every score by one constant
    for seed in range(5):
        table = random_table(seed)
        cfg = DecodeConfig(beam_size=beam, max_len=5, n_best=1)
        prompted = decode(TableDecoder(table), torch.zeros(1, 1), cfg, prefix=[B])[0][0]
        free = decode(TableDecoder(forced_start(table, B)), torch.zeros(1, 1), cfg)[0][0]
        assert prompted.tokens == free.tokens
        assert prompted.logprob == pytest.approx(free.logprob + float(table[START_ID, B]), abs=1e-4)


def test_prefix_counts_in_length_normalisation_and_ngram_blocking():
    # after "a b" the model wants "a b" again; blocking bigrams must see the prefix's "a b"
    table = make_table(
        {START_ID: {A: 1.0}, A: {B: 1.0}, B: {A: 0.9, END_ID: 0.1}, C: {END_ID: 1.0}}, 9
    )
    table[B, C] = math.log(0.05)
    cfg = DecodeConfig(beam_size=3, max_len=6, length_alpha=0.7, no_repeat_ngram=2)
    best = decode(TableDecoder(table), torch.zeros(1, 1), cfg, prefix=[A, B])[0][0]
    assert best.tokens[:2] == [A, B]
    pairs = list(zip(best.tokens, best.tokens[1:], strict=False))
    assert len(pairs) == len(set(pairs))
    assert best.score == pytest.approx(best.logprob / (len(best.tokens) + 1) ** 0.7)


def test_a_prefix_longer_than_a_caption_or_holding_special_tokens_is_refused():
    cfg = DecodeConfig(beam_size=2, max_len=3)
    dec = TableDecoder(random_table(1))
    with pytest.raises(ValueError, match="at most 3"):
        decode(dec, torch.zeros(1, 1), cfg, prefix=[A, B, C, D])
    for special in (PAD_ID, START_ID, END_ID, UNK_ID):
        with pytest.raises(ValueError, match="special tokens"):
            decode(dec, torch.zeros(1, 1), cfg, prefix=[A, special])
    # exactly max_len words: the prefix is the caption
    hyp = decode(dec, torch.zeros(1, 1), cfg, prefix=[A, B, C])[0][0]
    assert hyp.tokens == [A, B, C]
