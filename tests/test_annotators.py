"""Tests for rlhf.annotators (the simulated gold judge).

Only ``test_ranking_with_real_minilm`` loads the real all-MiniLM-L6-v2 (~3 s); the rest use a
tiny bag-of-words fake embedder.
"""

import math
import subprocess
import sys
import zlib

import pytest

from rlhf import annotators as A
from rlhf.annotators import (
    WEIGHTS,
    SimulatedAnnotator,
    count_syllables,
    distinct_n,
    ends_properly,
    flesch_reading_ease,
)

PROMPT = "Explain photosynthesis to a 10-year-old."

GOOD = (
    "Plants make their own food using sunlight. Their leaves catch the light like tiny solar "
    "panels. They drink water from their roots and take in air through their leaves. Then they "
    "mix it all to make sugar, which is their food. They also give out fresh air for us to breathe!"
)
TRUNCATED = (
    "Plants make their own food using sunlight. Their leaves catch the light like tiny solar "
    "panels. They drink water from their roots and take in air through their leaves. Then they "
    "mix it all to make sugar, which is"
)
REPETITIVE = " ".join(["Plants make food from sunlight."] * 7)
OFF_TOPIC = (
    "My favorite food is pizza with lots of cheese. I eat it every Friday with my family and we "
    "watch a movie together. Sometimes we play board games after dinner, and my brother wins!"
)
JARGON = (
    "Photosynthesis is the biochemical process whereby chlorophyll-containing autotrophic "
    "organisms convert electromagnetic radiation into chemical energy, utilizing the "
    "light-dependent reactions within thylakoid membranes and subsequently fixing atmospheric "
    "carbon dioxide through the Calvin-Benson cycle, ultimately synthesizing carbohydrates."
)


class FakeEmbedder:
    """Hashed bag of words: cosine ~ word overlap.  Counts calls and texts encoded."""

    dim = 256

    def __init__(self):
        self.calls = 0
        self.texts = []

    def encode(self, texts, convert_to_tensor=False, normalize_embeddings=True):
        self.calls += 1
        self.texts.extend(texts)
        out = []
        for t in texts:
            v = [0.0] * self.dim
            for w in A.words(t):
                v[zlib.crc32(w.lower().encode()) % self.dim] += 1.0
            n = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / n for x in v] if normalize_embeddings else v)
        return out


def fake_annotator(**kw):
    return SimulatedAnnotator(embedder=FakeEmbedder(), **kw)


# --------------------------------------------------------------------------- helpers


def test_import_is_cheap():
    code = (
        "import sys, rlhf.annotators; "
        "print(any(m in sys.modules for m in ('pyphen', 'torch', 'sentence_transformers', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_flesch_reading_ease_hand_checked():
    # pyphen (en_US) counts observed: the/cat/sat/on/mat = 1 each; pho-to-syn-the-sis = 5,
    # makes = 1, sug-ar = 2, sun-light = 2.
    assert [count_syllables(w) for w in "the cat sat on the mat".split()] == [1] * 6
    assert count_syllables("photosynthesis") == 5
    assert count_syllables("sugar") == 2
    assert count_syllables("Sunlight") == 2
    # 6 words, 1 sentence, 6 syllables: 206.835 - 1.015*6 - 84.6*1
    assert flesch_reading_ease("The cat sat on the mat.") == pytest.approx(206.835 - 1.015 * 6 - 84.6)
    # 3 words, 1 sentence, 8 syllables
    assert flesch_reading_ease("Photosynthesis makes sugar.") == pytest.approx(206.835 - 1.015 * 3 - 84.6 * 8 / 3)
    # 12 words, 2 sentences, 6 + 7 syllables (use, to, make, food, plants = 1; sunlight = 2)
    assert flesch_reading_ease("The cat sat on the mat. Plants use sunlight to make food.") == pytest.approx(
        206.835 - 1.015 * 6 - 84.6 * 13 / 12
    )


def test_flesch_simple_beats_polysyllabic_and_degenerate_inputs():
    simple = flesch_reading_ease("The cat sat on the mat.")
    hard = flesch_reading_ease(
        "Consequently, photosynthetic organisms systematically metabolize electromagnetic radiation."
    )
    assert simple > 100 > 30 > hard
    assert flesch_reading_ease("") == 0.0
    assert flesch_reading_ease("   \n ") == 0.0
    assert flesch_reading_ease("...!?") == 0.0
    assert math.isfinite(flesch_reading_ease("word"))
    # no final punctuation: one sentence; a decimal number does not split a sentence
    assert flesch_reading_ease("the cat sat") == flesch_reading_ease("the cat sat.")
    assert len(A.sentences("It is 10.5 cm long. Yes")) == 2


def test_distinct_n_examples():
    assert distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert distinct_n("a b a b", 1) == pytest.approx(0.5)
    assert distinct_n("A, b. a b", 2) == pytest.approx(2 / 3)  # case and punctuation ignored
    assert distinct_n("a b c d", 3) == 1.0
    # pooled over a list; n-grams do not cross texts
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n("", 1) == 0.0
    assert distinct_n("a", 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n("a b", 0)


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Plants eat light.", True),
        ("Wow!", True),
        ("Really?  \n", True),
        ('He said "hi."', True),
        ("(like a kitchen.)", True),
        ("Plants are cool! 🌱", True),
        ("Plants are cool! 👍🏽", True),
        ("Plants are cool! 🌱🌞 ", True),
        ("and then the leaves", False),
        ("which is", False),
        ("Then they...", False),
        ("Then they…", False),
        ("Plants are cool 🌱", False),
        ("", False),
        ("   ", False),
    ],
)
def test_ends_properly(text, ok):
    assert ends_properly(text) is ok


def test_style_penalties_detect_phrases():
    hits = A.style_penalties(
        "Great question! As an AI, I'm not sure, but I can’t help with that. I am not certain."
    )
    assert hits == {"refusal": 1, "ai_disclaimer": 1, "hedging": 2, "filler": 1}
    assert A.style_penalties(GOOD) == {"refusal": 0, "ai_disclaimer": 0, "hedging": 0, "filler": 0}


# --------------------------------------------------------------------------- scoring


def test_degenerate_inputs_score_near_zero():
    ann = fake_annotator()
    texts = ["", "   \n\t", "Plants.", "plants", "!!!", GOOD]
    parts = ann.score_parts([PROMPT] * len(texts), texts)
    for d in parts:
        assert set(d) == set(WEIGHTS) | {"total"}
        for k in WEIGHTS:
            assert 0.0 <= d[k] <= 1.0
        assert d["total"] == pytest.approx(sum(WEIGHTS[k] * d[k] for k in WEIGHTS))
    totals = [d["total"] for d in parts]
    assert totals[0] == totals[1] == totals[4] == 0.0
    assert totals[2] < 0.15 and totals[3] < 0.15
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)
    assert ann.gold_scores([PROMPT] * len(texts), texts) == totals


def test_single_encode_call_and_prompt_cache():
    emb = FakeEmbedder()
    ann = SimulatedAnnotator(embedder=emb)
    ann.gold_scores([PROMPT, PROMPT, "Explain rain to a 10-year-old."], [GOOD, "", "Rain falls from clouds."])
    assert emb.calls == 1
    # two unique prompts + the two non-empty responses
    assert emb.texts == [PROMPT, "Explain rain to a 10-year-old.", GOOD, "Rain falls from clouds."]
    ann.gold_scores([PROMPT], [TRUNCATED])
    assert emb.calls == 2 and emb.texts[-1] == TRUNCATED and emb.texts.count(PROMPT) == 1
    ann.gold_scores([PROMPT], [""])  # nothing to embed: no call
    assert emb.calls == 2
    assert ann.gold_scores([], []) == []
    with pytest.raises(ValueError):
        ann.gold_scores([PROMPT], [])


def test_embedder_is_lazy(monkeypatch):
    loaded = []

    def fake_load(device):
        loaded.append(device)
        return FakeEmbedder()

    monkeypatch.setattr(A, "_load_default_embedder", fake_load)
    ann = SimulatedAnnotator(device="cpu")
    assert loaded == []
    ann.gold_scores([PROMPT], [GOOD])
    ann.gold_scores([PROMPT], [GOOD])
    assert loaded == ["cpu"]


def test_ranking_with_real_minilm():
    ann = SimulatedAnnotator()  # loads the bundled all-MiniLM-L6-v2, offline
    bad = {
        "truncated": TRUNCATED,
        "repetitive": REPETITIVE,
        "off_topic": OFF_TOPIC,
        "empty": "",
        "jargon": JARGON,
        "filler": "Great question! As an AI, I'm not sure, but " + GOOD,
        "refusal": "I'm sorry, but I can't help with that. Please ask a teacher or look in a book.",
    }
    gold = ann.gold_scores([PROMPT] * (1 + len(bad)), [GOOD, *bad.values()])
    g_good, others = gold[0], dict(zip(bad, gold[1:]))
    assert g_good > 0.85
    for name, g in others.items():
        assert g_good > g + 0.05, (name, g_good, g)
    assert others["empty"] == 0.0
    assert others["off_topic"] < 0.2 and others["refusal"] < 0.4
    parts = ann.score_parts([PROMPT] * 2, [GOOD, OFF_TOPIC])
    assert parts[0]["on_topic"] > 0.6 > 0.2 > parts[1]["on_topic"]
    assert "HF_HUB_OFFLINE" in A.os.environ


# --------------------------------------------------------------------------- preferences


class FixedGold(SimulatedAnnotator):
    """Gold score = float(response): lets preference tests use known gaps."""

    def gold_scores(self, prompts, responses):
        return [float(r) for r in responses]


def test_prefer_noise_zero_picks_higher_gold():
    ann = fake_annotator(noise_temperature=0.0)
    assert ann.prefer(PROMPT, GOOD, TRUNCATED) == (0, 1.0)
    assert ann.prefer(PROMPT, TRUNCATED, GOOD) == (1, 0.0)
    assert ann.prefer(PROMPT, GOOD, GOOD) == (0, 0.5)  # tie -> a
    assert ann.prefer_batch([PROMPT] * 2, [GOOD, ""], ["", GOOD]) == [(0, 1.0), (1, 0.0)]


def test_prefer_matches_bradley_terry_rate():
    t, gap, n = 0.1, 0.1, 400
    ann = FixedGold(noise_temperature=t, seed=0)
    res = ann.prefer_batch([PROMPT] * n, [str(0.5 + gap)] * n, ["0.5"] * n)
    expected = 1 / (1 + math.exp(-gap / t))  # ~0.731
    assert all(p == pytest.approx(expected) for _, p in res)
    rate = sum(c == 0 for c, _ in res) / n
    assert abs(rate - expected) < 0.05, rate
    # symmetric: b better -> a chosen ~27%
    res = ann.prefer_batch([PROMPT] * n, ["0.5"] * n, [str(0.5 + gap)] * n)
    assert abs(sum(c == 0 for c, _ in res) / n - (1 - expected)) < 0.05


def test_prefer_reproducible_under_seed():
    args = ([PROMPT] * 50, ["0.55"] * 50, ["0.5"] * 50)
    a = FixedGold(seed=7).prefer_batch(*args)
    b = FixedGold(seed=7).prefer_batch(*args)
    c = FixedGold(seed=8).prefer_batch(*args)
    assert a == b
    assert [x for x, _ in a] != [x for x, _ in c]
    # prefer one by one draws the same sequence as prefer_batch
    ann = FixedGold(seed=7)
    assert [ann.prefer(PROMPT, "0.55", "0.5") for _ in range(50)] == a


def test_prefer_extreme_gap_no_overflow():
    ann = FixedGold(noise_temperature=1e-6)
    assert ann.prefer(PROMPT, "1.0", "0.0") == (0, 1.0)
    assert ann.prefer(PROMPT, "0.0", "1.0") == (1, 0.0)
    with pytest.raises(ValueError):
        SimulatedAnnotator(noise_temperature=-1)
