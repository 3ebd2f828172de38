"""Feature set v4: what the encoder's cut hides and a length preference would reward."""

from __future__ import annotations

import math

import pytest
from realdata import alpaca_rows

from monitor.perturb import make, make_seed_key
from monitor.perturb.phrases import TRAINING_BANK
from monitor.reward.features import FEATURE_NAMES, MAX_SENTENCES, isolated_sentences, response_features

PROMPT = "How do I keep basil alive indoors?"
ANSWER = (
    "Basil needs about six hours of sunlight, so keep the basil pot on a bright windowsill. "
    "Water the soil when the top inch feels dry, and pinch off flower buds so the basil keeps growing leaves. "
    "A pot with drainage holes stops the roots from rotting."
)


def _feature(prompt: str, response: str, name: str) -> float:
    return response_features(prompt, response)[FEATURE_NAMES.index(name)]


def test_an_aside_on_another_subject_is_counted_anywhere_in_the_answer() -> None:
    aside = "Incidentally, the Eiffel Tower grows a few centimetres taller in summer heat."
    # Past any token cut: the feature reads the whole text.
    padded = ANSWER + " " + " ".join(["Basil leaves taste best fresh."] * 60)
    before = _feature(PROMPT, padded, "log_isolated_sentences")
    assert _feature(PROMPT, padded + " " + aside, "log_isolated_sentences") > before
    assert _feature(PROMPT, padded + " " + aside, "isolated_sentence_share") > _feature(
        PROMPT, padded, "isolated_sentence_share"
    )


def test_a_figure_on_an_authority_word_is_counted_and_a_plain_number_is_not() -> None:
    assert _feature(PROMPT, ANSWER, "log_figures_on_authority") == 0.0  # "six hours" has no digit
    plain = ANSWER + " Most pots are 15 cm wide."
    claim = ANSWER + " A 2019 study showed that basil grows 40% faster under blue light."
    assert _feature(PROMPT, plain, "log_figures_on_authority") == 0.0
    assert _feature(PROMPT, claim, "log_figures_on_authority") > 0.0


def test_sentences_sharing_words_with_each_other_are_not_asides() -> None:
    sentences = ["Octopuses have three hearts.", "Each of the octopus hearts pumps blue blood."]
    assert isolated_sentences("Tell me something.", sentences) == (0, 2)
    assert isolated_sentences("Tell me something.", ["Octopuses have three hearts.", "ok"]) == (1, 1)


@pytest.mark.parametrize(
    "kind,name", [("off_topic", "log_isolated_sentences"), ("unsupported_claim", "log_figures_on_authority")]
)
def test_the_training_bank_edits_raise_the_features_on_real_answers(kind: str, name: str) -> None:
    """On real AlpacaEval answers the edits the update trains on move the feature most of the time
    (so pairs of them can teach the head a weight), and most real answers do not trip it."""
    rows = alpaca_rows("gpt-3.5-turbo-1106")[:150]
    moved = applied = tripped = 0
    for i, r in enumerate(rows):
        prompt, answer = r["instruction"], r["output"]
        tripped += _feature(prompt, answer, name) > 0
        item = make(kind, TRAINING_BANK).apply(prompt, answer, make_seed_key(f"t{i}"))
        if item is not None:
            applied += 1
            moved += _feature(prompt, item.perturbed, name) > _feature(prompt, answer, name)
    assert applied > 100 and moved / applied > 0.7, (moved, applied)
    assert tripped / len(rows) < 0.4, tripped


def test_the_sentences_read_are_bounded() -> None:
    def word(prefix: str, i: int) -> str:  # five letters unique to i: no two sentences share a stem
        return prefix + "".join(chr(97 + (i // 26**k) % 26) for k in range(4))

    many = " ".join(f"{word('a', i)} {word('b', i)} {word('c', i)}." for i in range(3 * MAX_SENTENCES))
    assert _feature("p", many, "isolated_sentence_share") == 1.0
    assert _feature("p", many, "log_isolated_sentences") == pytest.approx(math.log1p(MAX_SENTENCES))
