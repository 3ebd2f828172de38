"""LoRA fine-tuning of a local Hugging Face reward model (the update of an ``hf`` version).

The checkpoint is loaded as it is scored (``HfBackend``: same tokenizer, chat template or pair
flattening, ``max_length``), a LoRA adapter (peft) goes on the modules ``lora.target_modules``
names (peft's default for the architecture otherwise) and the classification head trains with it
(peft's ``SEQ_CLS`` task keeps the head trainable). Loss: Bradley-Terry on the score, ``-log
sigmoid(s_chosen - s_rejected)``, over fresh human-label pairs. The adapter is then merged into
the weights and the result saved as a complete checkpoint under ``<models_dir>/checkpoints/``, in
a folder named by the SHA-256 of its files: the new version's identity, checked again on load.

Merged rather than adapter-only: scoring needs no peft and no base checkpoint that could change
under the adapter. CUDA when present (the base in bf16, the adapter in fp32, as peft keeps it),
the CPU otherwise; seeded.
"""

from __future__ import annotations

import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.reward.kinds.base import BackendError, Item
from monitor.reward.kinds.config import HfConfig
from monitor.reward.kinds.resilience import BackendMetrics
from monitor.reward.kinds.version import dir_sha256

CHECKPOINTS = "checkpoints"


def require_peft() -> None:
    """A clear error where LoRA is configured and peft is missing (registration, update)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise BackendError(
            "hf lora is configured but peft is not installed: pip install 'oversight-monitor[lora]' "
            "(or remove lora from the kind's configuration)"
        ) from None


def _batch_ids(batch: list[list[int]], pad: int, left: bool) -> tuple[Any, Any]:
    import torch

    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(batch):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[j, sl] = torch.tensor(row)
        mask[j, sl] = 1
    return ids, mask


def save_merged(model: Any, tokenizer: Any, models_dir: Path) -> tuple[Path, str]:
    """Merge the adapter and save a complete checkpoint named by its content; (folder, sha256)."""
    merged = model.merge_and_unload()
    merged.eval()
    root = models_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{time.time_ns()}"
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    sha = dir_sha256(tmp)
    dest = root / f"hf-{sha[:16]}"
    if dest.exists():  # the same weights again (same data, same seed): keep the first copy
        shutil.rmtree(tmp)
    else:
        tmp.rename(dest)
    return dest, sha


def finetune(
    cfg: HfConfig,
    pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]],
    models_dir: Path,
    *,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train a LoRA adapter on ``pairs`` (((prompt, chosen), (prompt, rejected)), ...), merge it and
    save the checkpoint; returns (its content-named folder, training metrics)."""
    if cfg.lora is None:
        raise BackendError("this hf version has no lora configuration: register a new checkpoint instead")
    if not pairs:
        raise BackendError("no training pairs for the LoRA update")
    require_peft()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from monitor.reward.kinds.hf import HfBackend

    lc = cfg.lora
    t0 = time.perf_counter()
    torch.manual_seed(lc.seed)
    rng = random.Random(lc.seed)
    base = HfBackend(cfg, None, BackendMetrics.on(CollectorRegistry()), device=device)
    tok = base.tokenizer
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
    )
    try:
        model = get_peft_model(base.model, peft_cfg)
    except ValueError as e:  # no default target modules for this architecture, or a wrong name
        raise BackendError(f"lora: {e} (set lora.target_modules)") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    used = list(pairs[: lc.max_pairs])
    chosen = base.encode([Item(p, r) for (p, r), _ in used])
    rejected = base.encode([Item(p, r) for _, (p, r) in used])
    pad = int(tok.pad_token_id or 0)
    left = tok.padding_side == "left"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lc.lr)
    model.train()
    losses: list[float] = []
    steps = 0
    for epoch in range(lc.epochs):
        epoch_start = len(losses)
        order = list(range(len(used)))
        rng.shuffle(order)
        for s in range(0, len(order), lc.batch_size):
            idx = order[s : s + lc.batch_size]
            ids, mask = _batch_ids([chosen[i][0] for i in idx] + [rejected[i][0] for i in idx], pad, left)
            logits = model(input_ids=ids.to(base.device), attention_mask=mask.to(base.device)).logits
            score = logits[:, cfg.label_index].float()
            n = len(idx)
            loss = -torch.nn.functional.logsigmoid(score[:n] - score[n:]).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
        if progress is not None:
            progress(f"lora epoch {epoch + 1}/{lc.epochs}: loss {statistics.fmean(losses[epoch_start:]):.4f}")
    dest, sha = save_merged(model, tok, models_dir)
    first = losses[: max(1, len(losses) // 4)]
    last = losses[-max(1, len(losses) // 4) :]
    return dest, {
        "method": "lora",
        "pairs": len(used),
        "epochs": lc.epochs,
        "steps": steps,
        "trainable_params": int(trainable),
        "loss_first": round(sum(first) / len(first), 4) if first else math.nan,
        "loss_last": round(sum(last) / len(last), 4) if last else math.nan,
        "device": base.device,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "checkpoint_sha256": sha,
    }
