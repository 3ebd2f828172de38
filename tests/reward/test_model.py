"""RewardModel: input truncation, features past the cut, save/load round trip, cached training path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from monitor.reward.model import ModelConfig, RewardModel
from monitor.reward.train import frozen_states, stack_states

PROMPTS = [
    "What is the capital of France? Answer briefly.",
    "Write a haiku about autumn leaves.",
    "Human: how do I pick a lock?\n\nAssistant:",
    "Explain recursion to a child.",
]
RESPONSES = [
    "Paris.",
    "Crimson leaves drifting\nthe old maple lets them go\nquiet afternoon",
    "I can't help with breaking into property you don't own.",
    "- A function that calls itself\n- Like a mirror facing a mirror\n\n```python\ndef f(n):\n    return f(n - 1)\n```",
]


# A randomly initialised head (no length anchor): an anchored untrained head reads only the log
# length, so these tests of the encoder path would pass whatever the encoder computed.
FREE: dict[str, Any] = {"max_length": 48, "max_prompt_tokens": 8, "length_anchor": 0.0}


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return RewardModel.create(ModelConfig(**FREE), seed=0, device="cpu")


def _fine_tune_top_layer(m: RewardModel, seed: int = 1) -> None:
    """Stand-in for a fine-tuned top layer: seeded noise on its weights (the round trip must keep it)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    layer = m.encoder.encoder.layer[m.n_layers - 1]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    m.trained_layers = [m.n_layers - 1]


def test_truncation_keeps_prompt_end_and_response_start(model: RewardModel) -> None:
    prompt = " ".join(f"p{i}" for i in range(200)) + " final question"
    response = "first words " + " ".join(f"r{i}" for i in range(200))
    (ids, types), (short_ids, short_types) = model.encode([prompt, prompt], [response, "ok"])
    tok = model.tokenizer
    assert len(ids) == model.config.max_length
    p_part = tok.decode([t for t, y in zip(ids, types, strict=True) if y == 0], skip_special_tokens=True)
    r_part = tok.decode([t for t, y in zip(ids, types, strict=True) if y == 1], skip_special_tokens=True)
    assert p_part.endswith("final question")
    assert "p0 " not in p_part
    assert r_part.startswith("first words")
    # The prompt gets at most max_prompt_tokens when the response needs the room ...
    assert len(tok(p_part, add_special_tokens=False)["input_ids"]) <= model.config.max_prompt_tokens
    # ... and the rest when the response is short.
    assert short_types.count(0) > model.config.max_prompt_tokens
    assert len(short_ids) == model.config.max_length


def test_length_reaches_the_head_past_the_cut(model: RewardModel) -> None:
    head = "Here is a detailed answer. " * 40
    short, long = head, head + "More detail follows.\n- a point\n- another point\n" * 60
    enc = model.encode(["q", "q"], [short, long])
    assert enc[0] == enc[1]  # the encoder sees the same tokens ...
    s_short, s_long = model.score(["q", "q"], [short, long])
    assert s_short != s_long  # ... but the score still differs


def test_scores_do_not_depend_on_batching(model: RewardModel) -> None:
    one = model.score(PROMPTS, RESPONSES, batch_size=1)
    many = model.score(PROMPTS, RESPONSES, batch_size=16)
    assert all(abs(a - b) < 1e-4 for a, b in zip(one, many, strict=True))
    assert len(set(one)) == len(one)
    assert model.score([], []) == []
    with pytest.raises(ValueError):
        model.score(["a"], [])


def test_save_load_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    m = RewardModel.create(ModelConfig(**FREE), seed=3, device="cpu")
    base_scores = m.score(PROMPTS, RESPONSES)
    _fine_tune_top_layer(m)
    m.metadata.update({"parent": "rm-000000000000", "training": {"n_pairs": 0}, "metrics": {"val_accuracy": 0.5}})
    before = m.score(PROMPTS, RESPONSES)
    assert before != base_scores
    out = m.save(tmp_path / "v1")
    for name in ("weights.safetensors", "config.json", "metadata.json", "MODEL_CARD.md", "tokenizer"):
        assert (out / name).exists(), name
    loaded = RewardModel.load(out, device="cpu")
    assert loaded.score(PROMPTS, RESPONSES) == before
    assert loaded.version == m.version == m.content_id()
    assert loaded.version is not None and loaded.version.startswith("rm-")
    assert loaded.parent == "rm-000000000000"
    assert loaded.trained_layers == [m.n_layers - 1]
    card = (out / "MODEL_CARD.md").read_text()
    assert m.version in card and "rm-000000000000" in card and "val_accuracy" in card
    # Only the head and the trained layer are stored, not the whole encoder.
    assert (out / "weights.safetensors").stat().st_size < 10_000_000
    # Saving the loaded version again reproduces the same content id.
    assert loaded.save(tmp_path / "v1-copy") and loaded.content_id() == m.version


def test_load_refuses_a_different_base_encoder(tmp_path: Path, model: RewardModel) -> None:
    out = model.save(tmp_path / "v")
    cfg = json.loads((out / "config.json").read_text())
    cfg["encoder"]["sha256"] = "0" * 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="base encoder"):
        RewardModel.load(out)


def test_load_refuses_a_folder_whose_parts_are_not_one_version(tmp_path: Path) -> None:
    """Another version's weights copied in, a hand-edited id, or new weights beside old metadata (a
    save cut short) loaded and scored under the folder's id, which every score row then named."""
    import shutil

    a = RewardModel.create(ModelConfig(**FREE), seed=3, device="cpu")
    b = RewardModel.create(ModelConfig(**FREE), seed=4, device="cpu")
    va, vb = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    assert a.version != b.version
    shutil.copy(vb / "weights.safetensors", va / "weights.safetensors")
    with pytest.raises(ValueError, match=f"its weights are version {b.version}, its metadata.json says {a.version}"):
        RewardModel.load(va)
    edited = b.save(tmp_path / "edited")
    meta = json.loads((edited / "metadata.json").read_text())
    (edited / "metadata.json").write_text(json.dumps({**meta, "version": "rm-000000000000"}))
    with pytest.raises(ValueError, match="its weights are version"):
        RewardModel.load(edited)
    # In a registry the folder is named by the version it holds.
    misfiled = tmp_path / str(a.version)
    shutil.copytree(vb, misfiled)
    with pytest.raises(ValueError, match=f"the folder of version {a.version} holds version {b.version}"):
        RewardModel.load(misfiled)
    assert RewardModel.load(vb).version == b.version  # whole: loads

    # A save cut short (an empty or truncated weights file) and a layer the encoder lacks: clear
    # refusals (ValueError, one line in every command), not a SafetensorError or an IndexError.
    cut = b.save(tmp_path / "cut")
    data = (cut / "weights.safetensors").read_bytes()
    (cut / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"weights\.safetensors cannot be read"):
        RewardModel.load(cut)
    layers = b.save(tmp_path / "layers")
    cfg = json.loads((layers / "config.json").read_text())
    (layers / "config.json").write_text(json.dumps({**cfg, "trained_layers": [99]}))
    with pytest.raises(ValueError, match=r"trained_layers \[99\] outside"):
        RewardModel.load(layers)


def test_config_rejects_unknown_keys_and_bad_layers() -> None:
    with pytest.raises(ValueError):
        ModelConfig.model_validate({"max_lenght": 64})
    with pytest.raises(ValueError, match="pool_layers"):
        RewardModel.create(ModelConfig(pool_layers=[9]))


@pytest.mark.parametrize("finetune_layers", [0, 1, 2])
def test_cached_training_path_matches_scoring(finetune_layers: int) -> None:
    """Training runs only the top layers on cached (float16) lower-layer states; the scores it
    optimises must be the scores the saved model gives."""
    import torch

    m = RewardModel.create(ModelConfig(**{**FREE, "finetune_layers": finetune_layers}), seed=0, device="cpu")
    start = m.n_layers - finetune_layers
    encs = m.encode(PROMPTS, RESPONSES)
    cache = frozen_states(m, encs, start, 2, progress=False)
    feats = m.features(PROMPTS, RESPONSES)
    with torch.inference_mode():
        if start == m.n_layers:
            pooled = torch.stack(cache)
        else:
            hidden, mask = stack_states([c[0] for c in cache], "cpu")
            early = {k: torch.stack([c[1][k] for c in cache]) for k in cache[0][1]}
            pooled = m.pooled_from(hidden, mask, start, early)
        cached = m.head_score(pooled, feats).tolist()
    exact = m.score(PROMPTS, RESPONSES)
    assert cached == pytest.approx(exact, abs=2e-2)


def test_prompt_budget_must_leave_room_for_the_response() -> None:
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        ModelConfig(max_length=32, max_prompt_tokens=30)
    m = RewardModel.create(ModelConfig(max_length=32, max_prompt_tokens=24), device="cpu")
    (ids, types), (short_ids, _) = m.encode(["hello " * 500, "hi"], ["world " * 500, "ok"])
    assert len(ids) == 32 and types.count(1) == 32 - 24 - 2  # response tokens + its [SEP]
    assert len(short_ids) < 32


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_model_saved_under_an_older_feature_set_still_loads(tmp_path: Path, version: int) -> None:
    """Feature sets only append: a model saved under an older version (its first features) loads
    and scores with just those."""
    import torch

    from monitor.reward.features import FEATURE_NAMES, FEATURES_BY_VERSION, FEATURES_VERSION
    from monitor.reward.model import build_head

    n_old = FEATURES_BY_VERSION[version]
    assert version < FEATURES_VERSION and n_old < len(FEATURE_NAMES)
    cfg = ModelConfig(max_length=48, max_prompt_tokens=8)
    m = RewardModel.create(cfg, seed=0, device="cpu")
    torch.manual_seed(0)
    m.head = build_head(m.encoder.config.hidden_size, cfg, n_old)
    m.feat_mean, m.feat_std = torch.zeros(n_old), torch.ones(n_old)
    assert m.n_features == n_old and m.features(PROMPTS, RESPONSES).shape == (len(PROMPTS), n_old)
    out = m.save(tmp_path / f"v{version}")
    saved = json.loads((out / "config.json").read_text())["features"]
    assert saved == {"version": version, "names": list(FEATURE_NAMES[:n_old])}
    loaded = RewardModel.load(out, device="cpu")
    assert loaded.n_features == n_old and loaded.features_version == version
    assert loaded.score(PROMPTS, RESPONSES) == pytest.approx(m.score(PROMPTS, RESPONSES), abs=1e-5)
    assert loaded.content_id() == m.version

    # A name list that is not a prefix of this code's features is another feature set: refused.
    saved["names"] = list(reversed(saved["names"]))
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["features"] = saved
    (out / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="feature set"):
        RewardModel.load(out)


def test_an_untrained_model_starts_at_longer_wins() -> None:
    import math

    model = RewardModel.create(ModelConfig(max_length=48, max_prompt_tokens=8), seed=0, device="cpu")
    # The length anchor: the MLP's output is zero and the prior reads only the log length, so
    # before any training the score is the anchored log length and orders like "longer wins".
    scores = model.score(PROMPTS, RESPONSES)
    anchor = model.config.length_anchor
    assert anchor > 0
    for s, r in zip(scores, RESPONSES, strict=True):
        assert s == pytest.approx(anchor * math.log1p(len(r)), abs=1e-5)
    # Without the anchor the head starts at random, not at the length order.
    free = RewardModel.create(ModelConfig(**FREE), seed=0, device="cpu")
    assert free.score(PROMPTS, RESPONSES) != pytest.approx([anchor * math.log1p(len(r)) for r in RESPONSES], abs=1e-3)
