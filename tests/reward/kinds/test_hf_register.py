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


def test_a_max_length_past_the_models_positions_is_refused(tmp_path: Path) -> None:
    """Every item longer than the model's 512 positions failed its whole batch ("The expanded size
    of the tensor (905) must match the existing size (512)")."""
    ckpt = checkpoint(tmp_path)
    with pytest.raises(BackendError, match="max_length 1024 but the model reads at most 512 tokens"):
        KindVersion.create("hf", {"path": str(ckpt), "max_length": 1024})
    assert KindVersion.create("hf", {"path": str(ckpt), "max_length": 512}).version.startswith("hf-")


def _with_template(p: Path, template: str) -> None:
    conf = json.loads((p / "tokenizer_config.json").read_text())
    (p / "tokenizer_config.json").write_text(json.dumps(conf | {"chat_template": template}))


def test_a_chat_template_that_fails_on_a_plain_turn_is_refused(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path)
    _with_template(ckpt, "{{ raise_exception('this template renders nothing') }}")
    with pytest.raises(BackendError, match=r"its chat template fails on a user turn and an answer: .*renders nothing"):
        KindVersion.create("hf", {"path": str(ckpt)})


def test_a_chat_template_that_takes_too_long_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested loops pass Jinja's sandbox (it caps one range at 100,000): such a template held
    registration, and every scoring round after it, for as long as it ran."""
    from monitor.reward.kinds import hf

    monkeypatch.setattr(hf, "TEMPLATE_LIMIT_S", 0.2)
    ckpt = checkpoint(tmp_path)
    loops = "{% for i in range(2000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}"  # seconds, not 0.2
    _with_template(ckpt, loops + "{{ messages[0]['content'] }}")
    with pytest.raises(BackendError, match=r"its chat template took more than 0\.2 s to render one conversation"):
        KindVersion.create("hf", {"path": str(ckpt)})
    _with_template(ckpt, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert KindVersion.create("hf", {"path": str(ckpt)}).version.startswith("hf-")  # a sound one, in time


class _NotATensor:
    pass


def test_pickled_weights_that_are_not_tensors_alone_are_refused(tmp_path: Path) -> None:
    """Scoring loads a .bin as tensors only (weights_only); one that holds anything else
    registered, activated, and then left every episode unscored."""
    import torch

    ckpt = checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    torch.save({"classifier.bias": torch.zeros(1), "extra": _NotATensor()}, ckpt / "pytorch_model.bin")
    with pytest.raises(BackendError, match=r"pytorch_model\.bin: do not load as tensors"):
        KindVersion.create("hf", {"path": str(ckpt)})
    torch.save({"classifier.bias": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    assert KindVersion.create("hf", {"path": str(ckpt)}).version.startswith("hf-")
    # The format before torch 1.6, which cannot be mapped: read whole, still tensors only.
    torch.save({"classifier.bias": torch.ones(1)}, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert KindVersion.create("hf", {"path": str(ckpt)}).version.startswith("hf-")


def test_a_checkpoints_own_code_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config.json with an auto_map names code in the folder: transformers asked on stdin whether
    to run it (on stdout, in the middle of the command's JSON) and ran it on a "y"."""
    ckpt = checkpoint(tmp_path, model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    marker = tmp_path / "ran"
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(BackendError, match="its config does not load"):
        KindVersion.create("hf", {"path": str(ckpt)})
    assert not marker.exists() and "custom code" not in capsys.readouterr().out


def test_a_device_torch_does_not_know_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="device"):
        KindVersion.create("hf", {"path": str(checkpoint(tmp_path)), "device": "bogus"})
