"""``oversight rm ...``: reward-model pairs, training, evaluation, the registry and updates."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.cli.common import (
    Command,
    InputDir,
    InputFile,
    OutputDir,
    OutputFile,
    non_negative_float,
    non_negative_int,
    open_existing_store,
    open_store,
    positive_int,
    print_json,
    probability,
    progress_of,
    require_stream,
    settings_from_args,
)
from monitor.errors import CommandFailed, UsageError

if TYPE_CHECKING:
    from monitor.config import Settings
    from monitor.reward.model import RewardModel
    from monitor.store import Store

log = logging.getLogger("oversight")
REQUEST_STATES = ("pending", "running", "sent", "done", "failed")


def read_pairs(path: str, flag: str) -> list[dict[str, Any]]:
    from monitor.config import ConfigError
    from monitor.reward.data import read_pairs as read

    try:
        return read(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read pairs from {flag} {path}: {e}") from None


def load_model(path: str) -> RewardModel:
    from monitor.config import ConfigError
    from monitor.reward.model import RewardModel

    try:
        return RewardModel.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load reward model {path}: {e}") from None


# --- rm pairs ---------------------------------------------------------------------------------


def pairs_arguments(p: argparse.ArgumentParser) -> None:
    from monitor.reward.data import DATA_DIR_ENV

    p.add_argument(
        "--source",
        required=True,
        choices=["alpaca_eval", "hh_rlhf", "ratings"],
        help="AlpacaEval judge preferences, HH-RLHF harmless pairs, or reviewer ratings (--ratings)",
    )
    p.add_argument(
        "--out", required=True, metavar="FILE", type=OutputFile, help="pairs JSONL (gzip when it ends in .gz)"
    )
    p.add_argument("--split", default="all", choices=["train", "test", "all"], help="held-out side, by prompt group")
    p.add_argument("--test-fraction", type=probability, default=0.2, help="share of prompt groups on the test side")
    p.add_argument("--seed", type=int, default=0, help="split and AlpacaEval pair sampling seed")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        type=InputDir,
        help=f"folder holding alpaca_eval/ and hh_rlhf/ (default: ${DATA_DIR_ENV}; in a source checkout, the"
        " shared/data folder beside it)",
    )
    p.add_argument(
        "--ratings", metavar="FILE", type=InputFile, help="--source ratings: the review export's ratings JSONL"
    )
    p.add_argument(
        "--pairs-per-instruction", type=positive_int, default=4, help="alpaca_eval: model pairs per instruction"
    )
    p.add_argument(
        "--min-logit-margin", type=non_negative_float, default=1.0, help="alpaca_eval: skip closer judge preferences"
    )
    p.add_argument(
        "--min-gap", type=non_negative_float, default=1.0, help="ratings: smallest mean-rating gap that makes a pair"
    )
    p.add_argument("--limit", type=non_negative_int, help="keep the first N pairs")


def data_dir(args: argparse.Namespace) -> Path:
    """Where the AlpacaEval and HH-RLHF data are; the source's files must be there."""
    from monitor.reward.data import DATA_DIR_ENV, default_data_dir

    if args.data_dir is not None:
        root = Path(args.data_dir)
    else:
        try:
            root = default_data_dir()
        except FileNotFoundError:
            raise UsageError(
                f"--source {args.source} needs --data-dir DIR (or ${DATA_DIR_ENV}): the folder holding"
                " alpaca_eval/*.jsonl.gz and hh_rlhf/harmless-base-test.jsonl.gz"
            ) from None
    return root


def source_pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from monitor.reward import data

    if args.source == "ratings":
        if args.ratings is None:
            raise UsageError("--source ratings needs --ratings FILE")
        try:
            records = data.read_ratings(args.ratings)
        except UnicodeDecodeError as e:
            raise CommandFailed(f"--ratings {args.ratings}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except (OSError, ValueError) as e:  # both name the file (a ValueError its line, too)
            raise CommandFailed(f"--ratings {e}") from None
        return data.pairs_from_ratings(records, min_gap=args.min_gap)
    root = data_dir(args)
    if args.source == "alpaca_eval":
        folder = root / "alpaca_eval"
        if not any(folder.glob("*.jsonl.gz")):
            # An empty folder would make zero pairs and look like success.
            raise CommandFailed(f"no AlpacaEval data: {folder} holds no *.jsonl.gz")
        with damaged_data(folder):
            return data.alpaca_eval_pairs(
                folder,
                pairs_per_instruction=args.pairs_per_instruction,
                min_logit_margin=args.min_logit_margin,
                seed=args.seed,
            )
    path = root / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        raise CommandFailed(f"no HH-RLHF data: {path} does not exist")
    with damaged_data(path):
        return data.hh_rlhf_pairs(path)


@contextlib.contextmanager
def damaged_data(where: Path) -> Iterator[None]:
    """A data file that is not what its source's loader reads (truncated, another format, records of
    another shape): one line naming it, not the loader's exception."""
    try:
        yield
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CommandFailed(f"{where}: not readable as this source's data ({type(e).__name__}: {e})") from None


def cmd_rm_pairs(args: argparse.Namespace) -> int:
    from monitor.reward import data

    pairs = source_pairs(args)
    if args.split != "all":
        pairs = [p for p in pairs if data.split_of(data.group_of(p), args.test_fraction, args.seed) == args.split]
    if args.limit is not None:
        pairs = pairs[: args.limit]
    n = data.write_pairs(pairs, args.out)
    print(json.dumps({"pairs": n, "out": args.out, "source": args.source, "split": args.split}))
    return 0


# --- rm train / eval --------------------------------------------------------------------------


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, metavar="FILE", type=InputFile, help="training pairs JSONL")
    p.add_argument("--out", required=True, metavar="DIR", type=OutputDir, help="version directory to write")
    p.add_argument(
        "--base", metavar="DIR", type=InputDir, help="continue from this version (its parent in the metadata)"
    )
    p.add_argument("--config", metavar="FILE", type=InputFile, help="YAML training configuration")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting (repeatable), e.g. --set epochs=2 --set max_length=256",
    )
    p.add_argument("--eval-pairs", metavar="FILE", type=InputFile, help="also report held-out accuracy on these pairs")
    p.add_argument("--description", help="what the training data is (recorded in the model card)")


def cmd_rm_train(args: argparse.Namespace) -> int:
    from monitor.reward.train import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    pairs = read_pairs(args.pairs, "--pairs")
    if not pairs:
        raise CommandFailed(f"--pairs {args.pairs} holds no pairs: nothing to train on")
    eval_pairs = read_pairs(args.eval_pairs, "--eval-pairs") if args.eval_pairs else None
    # torch and the encoder only once the inputs are known to be good.
    from monitor.reward.train import evaluate, train

    base = load_model(args.base) if args.base else None
    model, metrics = train(
        pairs, cfg, base=base, progress=progress_of(args), description=args.description or f"pairs from {args.pairs}"
    )
    if eval_pairs is not None:
        held_out = evaluate(model, eval_pairs)
        metrics["test_accuracy"] = held_out["pairwise_accuracy"]
        metrics["test_length_baseline"] = held_out["length_baseline"]
        metrics["n_test"] = held_out["n"]
        model.metadata["metrics"].update({k: metrics[k] for k in ("test_accuracy", "test_length_baseline", "n_test")})
    model.save(args.out)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(json.dumps({"version": model.version, "parent": model.parent, "out": args.out, **summary}, sort_keys=True))
    return 0


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", type=InputDir, help="version directory")
    p.add_argument("--pairs", required=True, metavar="FILE", type=InputFile, help="pairs JSONL")
    p.add_argument("--batch-size", type=positive_int, default=32, help="pairs scored per forward pass")


def cmd_rm_eval(args: argparse.Namespace) -> int:
    pairs = read_pairs(args.pairs, "--pairs")
    from monitor.reward.train import evaluate

    model = load_model(args.model)
    print(json.dumps(evaluate(model, pairs, batch_size=args.batch_size), sort_keys=True))
    return 0


# --- the registry -----------------------------------------------------------------------------


def registry_of(settings: Settings, store: Store) -> Any:
    from monitor.reward.registry import Registry

    return Registry.for_settings(store, settings)


def register_arguments(p: argparse.ArgumentParser) -> None:
    from monitor.cli.rm_kinds import kind_arguments

    p.add_argument(
        "--model", metavar="DIR", type=InputDir, help="version directory (from rm train); --kind hf: the checkpoint"
    )
    p.add_argument("--activate", action="store_true", help="promote it without a gate (bootstrap, rollback)")
    kind_arguments(p)


def cmd_rm_register(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    # A registry may be set up before the pipeline ever ran (bootstrap): create the schema. The
    # database first: it fails in a second, loading a model takes longer.
    args.kind = args.kind or settings.reward.kind
    if args.kind == "builtin" and not args.model:
        raise UsageError("rm register needs --model DIR (a version directory from rm train)")
    store = open_store(settings)
    if args.kind != "builtin":
        from monitor.cli.rm_kinds import register_kind

        try:
            kind_out = register_kind(args, settings, store)
        finally:
            store.close()
        print_gate(kind_out.get("gate"))
        print(json.dumps(kind_out, sort_keys=True, default=str))
        return 0
    try:
        model = load_model(args.model)
        registry = registry_of(settings, store)
        version = registry.register(
            model, data_window=model.metadata.get("training", {}), metrics=model.metadata.get("metrics", {})
        )
        out: dict[str, Any] = {"version": version, "active": False}
        if args.gate:
            from monitor.cli.rm_kinds import gate

            out["gate"] = gate(args, settings, store, version)
            out["active"] = bool(out["gate"]["passed"])
        elif args.activate:
            out["generation"] = registry.promote(version, {"passed": True, "reason": "activated by hand"})
            out["active"] = True
    finally:
        store.close()
    print_gate(out.get("gate"))
    print(json.dumps(out, sort_keys=True))
    return 0


def print_gate(verdict: Any) -> None:
    """The gate's verdict in words on stderr (stdout stays one JSON object): the sizes, every
    agreement and the gain with their bounds, and whether it could decide."""
    from monitor.reward.update import render_gate

    if isinstance(verdict, dict) and "verdict" in verdict:
        print(render_gate(verdict), file=sys.stderr)


def cmd_rm_score_backlog(args: argparse.Namespace) -> int:
    from monitor.cli.rm_kinds import cmd_rm_score_backlog as run

    return run(args)


def backlog_arguments(p: argparse.ArgumentParser) -> None:
    from monitor.cli.rm_kinds import backlog_arguments as add

    add(p)


def promote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--version", dest="rm_version", metavar="V", required=True, help="the version to make active (rm versions)"
    )
    p.add_argument("--reason", required=True, help="why, recorded with the version beside its gate's verdict")
    p.add_argument("--by", help="who decided, recorded too (default: the login name)")


def cmd_rm_promote(args: argparse.Namespace) -> int:
    from monitor.reward.registry import RegistryError

    settings = settings_from_args(args)
    store = open_existing_store(settings)
    try:
        out = registry_of(settings, store).promote_by_hand(args.rm_version, args.reason, args.by or login_name())
    except RegistryError as e:
        raise UsageError(f"rm promote: {e}") from None
    finally:
        store.close()
    if out["changed"]:
        log.warning(
            "reward model %s made active by hand (it was %s; reason: %s)",
            out["version"],
            out["status_before"],
            args.reason,
        )
    print(json.dumps(out, sort_keys=True))
    return 0


def login_name() -> str:
    """Who runs the command, for the record: the login name, else ``unknown`` (a container's
    user may have no name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_rm_versions(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    store = open_existing_store(settings)
    try:
        registry = registry_of(settings, store)
        active = registry.active()
        rows = registry.versions()
    finally:
        store.close()
    for row in rows:
        row["active"] = active is not None and row["version"] == active[0]
        print_json(row)
    return 0


def requests_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["rm_update", "retrain"], help="only requests of this kind")
    p.add_argument("--state", choices=REQUEST_STATES, help="only requests in this state")


def cmd_rm_requests(args: argparse.Namespace) -> int:
    from monitor.store import requests as rq

    store = open_existing_store(settings_from_args(args))
    try:
        rows = rq.listing(store, kind=args.kind, state=args.state)
    finally:
        store.close()
    for row in rows:
        print_json(row)
    return 0


# --- rm update --------------------------------------------------------------------------------


def update_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--request", metavar="ID", help="run this rm_update request (default: the oldest one waiting for a trainer)"
    )
    g.add_argument("--stream", help="by hand: the stream whose fresh labels drive the update")
    p.add_argument(
        "--since", type=float, default=0.0, help="with --stream: event time (epoch seconds) where 'fresh' starts"
    )


def claim_request(store: Store, request: str | None) -> dict[str, Any] | None:
    """The rm_update request to run, claimed for this process (a finished one as it is); None when
    there is nothing to do."""
    from monitor.store import requests as rq

    if request is None:
        waiting = [r for r in rq.listing(store, kind="rm_update") if r["state"] in ("sent", "pending")]
        if not waiting:
            return None
        request = waiting[-1]["id"]  # listing is newest first
    req = rq.get(store, request)
    if req is None or req["kind"] != "rm_update":
        raise UsageError(f"no rm_update request {json.dumps(request)}")
    if req["state"] in ("done", "failed"):
        return req
    # A request handed to a trainer (Kafka, webhook, Kubernetes Job) was marked sent; a local one
    # is pending. Either way only one runner wins the claim.
    if not (rq.claim(store, req["id"], "sent", "running") or rq.claim(store, req["id"], "pending", "running")):
        raise CommandFailed(f"request {req['id']} is {req['state']}: another trainer has it")
    return req


def cmd_rm_update(args: argparse.Namespace) -> int:
    from monitor.store import requests as rq

    settings = settings_from_args(args)
    store = open_existing_store(settings)
    try:
        if args.stream is not None:
            require_stream(store, args.stream)
            result = run_update(args, settings, store, None, args.stream, args.since)
        else:
            req = claim_request(store, args.request)
            if req is None:
                result = {"request": None, "state": "nothing to do"}
            elif req["state"] in ("done", "failed"):
                result = {"request": req["id"], "state": req["state"], "result": req["result"]}
            else:
                rid = req["id"]
                result = run_update(
                    args, settings, store, rid, req["payload"]["stream"], float(req["payload"]["since"])
                )
                rq.finish(store, rid, "done", result=result)
    finally:
        store.close()
    print_gate(result.get("gate") or (result.get("result") or {}).get("gate"))
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def run_update(
    args: argparse.Namespace, settings: Settings, store: Store, request: str | None, stream: str, since: float
) -> dict[str, Any]:
    from monitor.reward.update import UpdateError
    from monitor.reward.update import run_update as update
    from monitor.store import requests as rq

    # A request claimed here is held while it runs (the action worker would otherwise take it over
    # as abandoned after reward.update.lease_s and run it again), and never left running: whatever
    # stops the update marks it failed, so a trainer's retry is not refused as "running" forever.
    lease = contextlib.nullcontext() if request is None else rq.held(store, request, settings.reward.update.lease_s)
    try:
        with lease:
            result: dict[str, Any] = update(
                settings, store, stream=stream, since=since, request_id=request, progress=progress_of(args)
            )
    except UpdateError as e:
        if request is not None:
            rq.finish(store, request, "failed", error=str(e))
        raise CommandFailed(f"update failed: {e}") from None
    except BaseException as e:
        if request is not None:
            with contextlib.suppress(Exception):  # the database may be what failed: its lease then expires
                rq.finish(store, request, "failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    return result


COMMANDS = (
    Command(
        ("rm", "pairs"),
        "write {prompt, chosen, rejected} pairs JSONL from AlpacaEval, HH-RLHF or reviewer ratings",
        cmd_rm_pairs,
        pairs_arguments,
        (),
    ),
    Command(
        ("rm", "train"),
        "train a reward-model version on pairs (Bradley-Terry)",
        cmd_rm_train,
        train_arguments,
        ("progress",),
    ),
    Command(("rm", "eval"), "pairwise accuracy of a version on pairs (JSON)", cmd_rm_eval, eval_arguments, ()),
    Command(
        ("rm", "update"),
        "run a reward-model update now: train on fresh labels, gate against the active version, promote or reject",
        cmd_rm_update,
        update_arguments,
        ("settings", "db", "progress"),
    ),
    Command(
        ("rm", "register"),
        "add a version directory to the registry (optionally make it active)",
        cmd_rm_register,
        register_arguments,
    ),
    Command(
        ("rm", "promote"),
        "make a registered version active by hand, over its gate's verdict, with the reason on record",
        cmd_rm_promote,
        promote_arguments,
    ),
    Command(("rm", "versions"), "list registered versions (JSON lines) and the active one", cmd_rm_versions),
    Command(
        ("rm", "score-backlog"),
        "score sampled episodes still without a reward-model score (a remote kind's backlog) now",
        cmd_rm_score_backlog,
        backlog_arguments,
        ("settings", "db", "progress"),
    ),
    Command(
        ("rm", "requests"),
        "list reward-model update and retraining requests (JSON lines)",
        cmd_rm_requests,
        requests_arguments,
    ),
)
