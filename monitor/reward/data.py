"""Preference pairs ``{"prompt", "chosen", "rejected"}`` for reward-model training and evaluation.

Sources:

* **HH-RLHF harmless** (``hh_rlhf_pairs``): each row holds two dialogues that share every
  turn but the last assistant turn. The shared prefix (ending in ``"\\n\\nAssistant:"``) is the
  prompt; the two last assistant turns are ``chosen`` and ``rejected`` (the crowdworker's pick).
* **AlpacaEval** (``alpaca_eval_pairs``): for one instruction, two models' outputs; the one the
  GPT-4-turbo judge prefers more is ``chosen``. ``judge_pref`` is P(judge prefers the output over
  the gpt4_1106_preview reference), so under the judge's own Bradley-Terry reading
  ``logit(p_a) - logit(p_b)`` is the log-odds that it prefers a over b. Pairs whose log-odds
  margin is below ``min_logit_margin`` (default 1.0, i.e. the judge prefers the winner with less
  than ~73% probability) are ties or noise and are skipped. Models without judge labels and the
  two adversarial generators (NullModel, gpt4_gamed: built to fool the judge) are excluded by
  default: their "wins" are reward hacking, which a reward model must not learn to like.
* **Reviewer ratings** (``pairs_from_ratings``): rated episodes of the same prompt with different
  mean ratings.

Every pair carries a ``group`` (the instruction, or the first human turn of an HH dialogue), and
train/test splits are made by group with a keyed hash (``split_of``), so no instruction is ever on
both sides and a pair's side does not depend on which other pairs exist.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import math
import os
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from monitor.fileio import open_maybe_gzip

Pair = dict[str, Any]
Split = Literal["train", "test"]

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
DEFAULT_EXCLUDE = frozenset({"NullModel", "gpt4_gamed", "Mixtral-8x7B-Instruct-v0.1"})
DEFAULT_TEST_FRACTION = 0.2
# Where the AlpacaEval and HH-RLHF data are (see default_data_dir).
DATA_DIR_ENV = "REWARD_DATA_DIR"


def default_data_dir() -> Path:
    """The folder holding ``alpaca_eval/`` and ``hh_rlhf/``: ``$REWARD_DATA_DIR``, else, in a source
    checkout only, the ``shared/data`` folder beside it.

    The variable is deliberately not under ``OVERSIGHT_``: settings reject unknown ``OVERSIGHT_*``
    variables, so such a name would break every other command. An installed package or the image
    has no checkout beside it; there this raises ``FileNotFoundError`` naming the variable instead
    of pointing into site-packages' parent folders.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    beside = repo.parent / "shared" / "data"
    if (repo / "pyproject.toml").is_file() and beside.is_dir():
        return beside
    raise FileNotFoundError(
        f"no preference data folder: set {DATA_DIR_ENV} to the folder holding alpaca_eval/ and hh_rlhf/"
    )


def split_of(group: str, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0) -> Split:
    """Deterministic side of a group: a hash, so the split never depends on the rest of the data."""
    h = hashlib.sha256(f"{seed}\x00{group}".encode()).digest()
    return "test" if int.from_bytes(h[:8], "big") / 2**64 < test_fraction else "train"


def split_pairs(
    pairs: Iterable[Pair], test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    train: list[Pair] = []
    test: list[Pair] = []
    for p in pairs:
        (test if split_of(group_of(p), test_fraction, seed) == "test" else train).append(p)
    return train, test


def group_of(pair: Mapping[str, Any]) -> str:
    return str(pair.get("group") or pair["prompt"])


def _jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open_maybe_gzip(path, text=True) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --- HH-RLHF -----------------------------------------------------------------------------------


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen last turn, rejected last turn), or None when the two share no prompt."""
    cut = chosen.rfind(ASSISTANT)
    if cut >= 0 and rejected.startswith(chosen[: cut + len(ASSISTANT)]):
        end = cut + len(ASSISTANT)
    else:
        # A few rows have "Assistant:" inside the chosen answer: fall back to the longest common
        # prefix, cut back to its last assistant marker.
        n = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            n += 1
        cut = chosen.rfind(ASSISTANT, 0, n)
        if cut < 0:
            return None
        end = cut + len(ASSISTANT)
    prompt = chosen[:end]
    c, r = chosen[end:].strip(), rejected[end:].strip()
    if c == r:
        return None
    return prompt.strip(), c, r


def first_human_turn(prompt: str) -> str:
    body = prompt.strip()
    if body.startswith("Human:"):
        body = body[len("Human:") :]
    return body.split(ASSISTANT.strip(), 1)[0].split(HUMAN.strip(), 1)[0].strip()


def hh_rlhf_pairs(path: str | os.PathLike[str] | None = None) -> list[Pair]:
    """Harmless-base pairs; grouped by the first human turn (red-team openings repeat with
    different continuations, and a test prompt must not have been seen in training)."""
    src = Path(path) if path is not None else default_data_dir() / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    out: list[Pair] = []
    for row in _jsonl(src):
        parts = split_dialogue(row["chosen"], row["rejected"])
        if parts is None:
            continue
        prompt, chosen, rejected = parts
        out.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "group": first_human_turn(prompt),
                "source": "hh_rlhf",
            }
        )
    return out


# --- AlpacaEval --------------------------------------------------------------------------------


def logit(p: float) -> float:
    """log(p / (1 - p)) with p clipped to [1e-4, 1 - 1e-4]: a judge preference as log-odds."""
    # The judge's probabilities go down to ~1e-6; clipping keeps one saturated label from
    # dominating the margin.
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def load_alpaca_eval(
    data_dir: str | os.PathLike[str] | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> dict[str, list[dict[str, Any]]]:
    """Judge-labelled rows by instruction, models in sorted order (deterministic)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir() / "alpaca_eval"
    skip = set(exclude)
    by_instruction: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in sorted(root.glob("*.jsonl.gz")):
        model = f.name.removesuffix(".jsonl.gz")
        if model in skip:
            continue
        for row in _jsonl(f):
            if row.get("judge_pref") is None or not isinstance(row.get("output"), str):
                continue
            by_instruction[row["instruction"]].append(row)
    return dict(by_instruction)


def alpaca_eval_pairs(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    pairs_per_instruction: int | None = 4,
    min_logit_margin: float = 1.0,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    seed: int = 0,
    instructions: Callable[[str], bool] | None = None,
    models: Callable[[str, str], bool] | None = None,
) -> list[Pair]:
    """Up to ``pairs_per_instruction`` random model pairs per instruction (seeded; None: every
    pair), each with a judge log-odds margin of at least ``min_logit_margin``; the judge's favourite
    is ``chosen``. ``instructions`` keeps only the instructions it accepts and ``models`` only the
    pairs of generators it accepts (both before sampling, so a restricted set still gets its
    ``pairs_per_instruction``)."""
    out: list[Pair] = []
    for instruction, rows in sorted(load_alpaca_eval(data_dir, exclude).items()):
        if instructions is not None and not instructions(instruction):
            continue
        candidates = []
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                if a["output"].strip() == b["output"].strip():
                    continue
                if models is not None and not models(a["generator"], b["generator"]):
                    continue
                margin = logit(a["judge_pref"]) - logit(b["judge_pref"])
                if abs(margin) >= min_logit_margin:
                    candidates.append((a, b) if margin > 0 else (b, a))
        # Per-instruction RNG: one instruction's pairs do not depend on how many others exist.
        rng = random.Random(f"{seed}\x00{instruction}")
        rng.shuffle(candidates)
        for win, lose in candidates if pairs_per_instruction is None else candidates[:pairs_per_instruction]:
            out.append(
                {
                    "prompt": instruction,
                    "chosen": win["output"],
                    "rejected": lose["output"],
                    "group": instruction,
                    "source": "alpaca_eval",
                    "chosen_model": win["generator"],
                    "rejected_model": lose["generator"],
                    "margin": round(abs(logit(win["judge_pref"]) - logit(lose["judge_pref"])), 4),
                }
            )
    return out


def alpaca_eval_models(
    data_dir: str | os.PathLike[str] | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> list[str]:
    """The judge-labelled generators (sorted), i.e. the models ``alpaca_eval_pairs`` pairs up."""
    return sorted({r["generator"] for rows in load_alpaca_eval(data_dir, exclude).values() for r in rows})


# Models set aside to tune the built-in reward model's defaults on (bench/rm_train.py --split dev);
# the reported held-out folds are made of the other models only, so no default was chosen by
# looking at a reported test model. Four different families and styles: a chat model, a verbose
# and a concise prompted variant, and a small model.
DEV_MODELS = ("Qwen-14B-Chat", "alpaca-7b_verbose", "gemma-2b-it", "gpt-3.5-turbo-1106_concise")


def model_folds(models: Sequence[str], n_folds: int = 3, dev: Iterable[str] = DEV_MODELS) -> list[list[str]]:
    """The models other than ``dev`` dealt round-robin (sorted) into ``n_folds`` test folds."""
    if n_folds < 1:
        raise ValueError("n_folds must be at least 1")
    rest = sorted(set(models) - set(dev))
    return [rest[k::n_folds] for k in range(n_folds)]


def heldout_model_split(
    test_models: Iterable[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    pairs_per_instruction: int = 4,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> tuple[list[Pair], list[Pair]]:
    """(train, test) AlpacaEval pairs with whole models *and* instructions held out.

    Train: instructions on the train side of ``split_of(.., test_fraction, seed)``, pairs of two
    models outside ``test_models`` (``pairs_per_instruction`` of them). Test: every judge pair
    (margin as in ``alpaca_eval_pairs``) on a held-out instruction with at least one answer from
    a ``test_models`` model, so no training pair comes from a test model or a test instruction,
    and each held-out model is compared with every other model on the same instructions."""
    held = frozenset(test_models)
    if not held:
        raise ValueError("no test models")

    def is_test(instruction: str) -> bool:
        return split_of(instruction, test_fraction, seed) == "test"

    train = alpaca_eval_pairs(
        data_dir,
        pairs_per_instruction=pairs_per_instruction,
        exclude=exclude,
        seed=seed,
        instructions=lambda i: not is_test(i),
        models=lambda a, b: a not in held and b not in held,
    )
    test = alpaca_eval_pairs(
        data_dir,
        pairs_per_instruction=None,
        exclude=exclude,
        seed=seed,
        instructions=is_test,
        models=lambda a, b: a in held or b in held,
    )
    return train, test


# --- reviewer ratings --------------------------------------------------------------------------


def pairs_from_ratings(
    records: Iterable[Mapping[str, Any]],
    min_gap: float = 1.0,
    *,
    across_prompts: bool = False,
    partners: int = 8,
    seed: int = 0,
) -> list[Pair]:
    """Pairs from rated episodes (the review export's rating records: ``prompt``, ``response``,
    ``rating``, optional ``skipped``). Several ratings of one response are averaged first (doubly
    reviewed items); two responses to the same prompt whose mean ratings differ by at least
    ``min_gap`` make a pair, the better-rated one chosen.

    ``across_prompts`` reads the ratings as absolute (a Likert scale, the same for every prompt),
    i.e. as pointwise targets: then each rated response is also paired with up to ``partners``
    responses to *other* prompts (drawn with a seeded, per-response RNG) whose rating differs by at
    least ``min_gap``; such a pair names the rejected response's prompt in ``rejected_prompt``. With
    sampled traffic two reviewed answers to one prompt are rare, so this is what makes a few hundred
    labels enough to train on."""
    by_prompt: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.get("skipped") or rec.get("rating") is None:
            continue
        by_prompt[str(rec["prompt"])][str(rec["response"])].append(float(rec["rating"]))
    out: list[Pair] = []
    for prompt in sorted(by_prompt):
        means = sorted(((statistics.fmean(v), resp) for resp, v in by_prompt[prompt].items()), reverse=True)
        for i, (hi, better) in enumerate(means):
            for lo, worse in means[i + 1 :]:
                if hi - lo >= min_gap:
                    out.append(
                        {
                            "prompt": prompt,
                            "chosen": better,
                            "rejected": worse,
                            "group": prompt,
                            "source": "ratings",
                            "margin": hi - lo,
                        }
                    )
    if not across_prompts or partners <= 0:
        return out
    items = sorted(
        (statistics.fmean(v), prompt, resp) for prompt, resps in by_prompt.items() for resp, v in resps.items()
    )
    seen: set[tuple[int, int]] = set()
    ratings = [r for r, _, _ in items]
    positions: dict[str, list[int]] = defaultdict(list)  # prompt -> its responses' places in items
    for j, (_, prompt_j, _) in enumerate(items):
        positions[prompt_j].append(j)
    for i, (ri, prompt_i, resp_i) in enumerate(items):
        # The candidates, as the list of every index far enough in rating from another prompt, without
        # building it: a scan of every item for every item cost time quadratic in the labels ever
        # stored (16,000 rated responses: 120 s per update). The same sequence, so the same draw.
        others = Partners(
            bisect.bisect_right(ratings, ri - min_gap),
            bisect.bisect_left(ratings, ri + min_gap),
            len(items),
            positions[prompt_i],
        )
        # Per-response RNG: a response's partners do not depend on the order labels arrived in.
        rng = random.Random(hashlib.sha256(f"{seed}\x00{prompt_i}\x00{resp_i}".encode()).hexdigest())
        for j in rng.sample(others, min(partners, len(others))):
            key = (min(i, j), max(i, j))
            if key in seen:
                continue
            seen.add(key)
            (rb, pb, b), (rw, pw, w) = (items[i], items[j]) if ri > items[j][0] else (items[j], items[i])
            out.append(
                {
                    "prompt": pb,
                    "chosen": b,
                    "rejected_prompt": pw,
                    "rejected": w,
                    "group": pb,
                    "source": "ratings",
                    "margin": rb - rw,
                }
            )
    return out


class Partners(Sequence[int]):
    """The indices ``[0, low) + [high, size)`` without ``skip`` (sorted), as a read-only sequence:
    ``random.sample`` draws from it as from the list, at the cost of ``len(skip)`` per item read.

    >>> list(Partners(2, 5, 8, [1, 6])), Partners(2, 5, 8, [1, 6])[2]
    ([0, 5, 7], 7)
    """

    def __init__(self, low: int, high: int, size: int, skip: Sequence[int]) -> None:
        self._low, self._high = low, max(low, high)
        self._skip = [j for j in skip if j < low or j >= self._high]
        self._len = low + (size - self._high) - len(self._skip)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self._len))]
        if not 0 <= k < self._len:
            raise IndexError(k)
        t = k  # the place in the union of the two ranges, the skipped indices counted back in
        for s in self._skip:  # sorted, as their places in the union are
            if self._place(s) <= t:
                t += 1
            else:
                break
        return t if t < self._low else self._high + (t - self._low)

    def _place(self, j: int) -> int:
        return j if j < self._low else self._low + (j - self._high)


# --- files -------------------------------------------------------------------------------------


def _text(obj: Mapping[str, Any], key: str, where: str) -> None:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string")
    try:  # a lone surrogate ("\\ud800" in the JSON) parses, but no tokenizer or file takes it
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: {key!r} holds a lone surrogate (not Unicode text)") from None


def validate_pair(obj: Any, where: str = "pair") -> Pair:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        _text(obj, key, where)
    if obj.get("rejected_prompt") is not None:
        _text(obj, "rejected_prompt", f"{where} (when given)")
    return obj


def validate_rating(obj: Any, where: str = "rating") -> dict[str, Any]:
    """A rating record as :func:`pairs_from_ratings` reads it: ``prompt`` and ``response``
    strings, ``rating`` a finite number or null (unrated), ``skipped`` a boolean when given."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("prompt", "response"):
        _text(obj, key, where)
    rating = obj.get("rating")
    if rating is not None and (
        isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating)
    ):
        raise ValueError(f"{where}: 'rating' must be a finite number or null, not {rating!r}")
    if not isinstance(obj.get("skipped", False), bool):
        raise ValueError(f"{where}: 'skipped' must be true or false when given")
    return obj


def read_ratings(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rating records from a JSONL file (plain or gzip; the review export's ratings), each checked
    by :func:`validate_rating`; an error names the line."""
    return _read_checked(path, validate_rating)


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Pairs from a JSONL file (plain or gzip); every line must hold prompt, chosen and rejected."""
    return _read_checked(path, validate_pair)


MAX_LINE = 64 << 20  # characters of one pair or rating: far more than any real one


def _read_checked(path: str | os.PathLike[str], check: Callable[[Any, str], Any]) -> list[Any]:
    """Every non-blank line of a JSONL file, parsed and passed through ``check(obj, "path:line")``."""
    out = []
    with open_maybe_gzip(path, text=True) as fh:
        # Lines of at most MAX_LINE characters: a file of /dev/zero was one line read until memory ran out.
        for n, line in enumerate(iter(lambda: fh.readline(MAX_LINE + 1), ""), 1):
            if len(line) > MAX_LINE:
                raise ValueError(f"{path}:{n}: a line longer than {MAX_LINE} characters")
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from None
                out.append(check(obj, f"{path}:{n}"))
    return out


def write_pairs(pairs: Iterable[Pair], path: str | os.PathLike[str]) -> int:
    n = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(validate_pair(p), ensure_ascii=True, sort_keys=True) + "\n")
            n += 1
    return n
