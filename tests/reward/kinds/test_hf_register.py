"""Registering an ``hf`` checkpoint checks it without loading its weights: a broken one is refused
with its problem named, where it used to register (and activate) and then leave every rm-sampled
episode unscored. Built from the bundled MiniLM checkpoint, its config edited per case (fast: no
weights are loaded)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.reward.kinds import BackendError, KindVersion
from monitor.reward.model import packaged_encoder_dir


def checkpoint(tmp_path: Path, **config: object) -> Path:
    """The bundled encoder's files, its config.json saying a one-label sequence classifier (or ``config``)."""
    out = tmp_path / "ckpt"
    shutil.copytree(packaged_encoder_dir(), out)
    conf = json.loads((out / "config.json").read_text())
    conf.update({"architectures": ["BertForSequenceClassification"], "num_labels": 1} | config)
    (out / "config.json").write_text(json.dumps(conf))
    return out


def test_a_sound_checkpoint_registers(tmp_path: Path) -> None:
    kv = KindVersion.create("hf", {"path": str(checkpoint(tmp_path)), "max_length": 64})
    assert kv.version.startswith("hf-") and kv.identity["checkpoint_sha256"]


def _bad_json(p: Path) -> None:
    (p / "config.json").write_text("{bad")


def _garbage_weights(p: Path) -> None:
    (p / "model.safetensors").write_bytes(b"garbage, not a safetensors header")


def _no_weights(p: Path) -> None:
    (p / "model.safetensors").unlink()


def _missing_shard(p: Path) -> None:
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _broken_tokenizer(p: Path) -> None:
    (p / "tokenizer.json").write_text("{not a tokenizer")


def _base_encoder(p: Path) -> None:
    conf = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps(conf | {"architectures": ["BertModel"]}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_json, "its config does not load"),
        (_garbage_weights, "model.safetensors: Error while deserializing header"),
        (_no_weights, "no weights"),
        (_missing_shard, "names missing shards: model-00002-of-00002.safetensors"),
        (_broken_tokenizer, "its tokenizer does not load"),
        (_base_encoder, "not a reward model"),
    ],
)
def test_a_broken_checkpoint_is_refused_with_its_problem(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    ckpt = checkpoint(tmp_path)
    damage(ckpt)
    with pytest.raises(BackendError, match=message):
        KindVersion.create("hf", {"path": str(ckpt)})


def test_a_label_the_checkpoint_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=re.escape("label_index 1 but config.json has 1 labels")):
        KindVersion.create("hf", {"path": str(checkpoint(tmp_path)), "label_index": 1})
    two = checkpoint(tmp_path / "two", num_labels=2, id2label={"0": "bad", "1": "good"})
    assert KindVersion.create("hf", {"path": str(two), "label_index": 1}).version.startswith("hf-")
