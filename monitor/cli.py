"""``oversight``: the command line. Imports stay inside the commands so ``--help`` is fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.config import Settings

log = logging.getLogger("oversight")


def _common(p: argparse.ArgumentParser, *, db: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting by dotted key (repeatable), e.g. --set sampling.human.rate=0.05",
    )
    if db:
        p.add_argument("--db", metavar="URL", help="database URL (sqlite:///PATH or postgresql://...)")
    p.add_argument("--dev", action="store_true", default=None, help="development mode (built-in sampling key allowed)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oversight",
        description="Continuous deployment-time oversight monitor for deployed language models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline as a service (source -> validate -> sample -> store)")
    _common(p)
    p.add_argument(
        "--input", metavar="FILE", help="shortcut for --set source.kind=file --set source.path=FILE ('-' for stdin)"
    )
    p.add_argument("--review", action="store_true", help="also serve the review UI and API in this process")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="run the pipeline over a file as fast as possible and write a report")
    _common(p)
    p.add_argument("--input", required=True, metavar="FILE", help="JSONL episodes (plain or gzip; '-' for stdin)")
    p.add_argument("--report", required=True, metavar="REPORT.json")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "demo", help="the closed loop (simulate) on the bundled real traffic, with the review UI and /metrics live"
    )
    _common(p, db=False)
    p.add_argument("--workdir", default=".oversight-demo", help="where the demo keeps its database and dead letters")
    p.add_argument("--port", type=int, default=9108, help="port of /metrics, /healthz, /readyz")
    p.add_argument("--review-port", type=int, default=8080, help="port of the review UI")
    p.add_argument(
        "--exit-after-replay", action="store_true", help="exit after the summary instead of serving until Ctrl-C"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "simulate",
        help="the closed loop over an episode file: drift -> boosted review by a simulated reviewer pool"
        " -> reward-model update -> retraining request",
    )
    _common(p)
    p.add_argument(
        "--input", required=True, metavar="FILE", help="JSONL episodes (plain or gzip) with metadata answers"
    )
    p.add_argument("--report", required=True, metavar="REPORT.json")
    p.add_argument("--review-port", type=int, default=0, help="port of the review UI while it runs (0: any free)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("estimate", help="Horvitz-Thompson estimate over all traffic of a stream from sampled items")
    _common(p)
    p.add_argument("--stream", required=True)
    p.add_argument("--channel", default="rm", choices=["human", "rm", "drift"])
    p.add_argument(
        "--quantity",
        required=True,
        help="per-episode quantity: response_chars, prompt_chars, empty_response, or metadata.KEY (numeric or boolean)",
    )
    p.add_argument("--since", help="window start (RFC 3339 or epoch seconds)")
    p.add_argument("--until", help="window end (RFC 3339 or epoch seconds)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("serve", help="run the review web UI and API")
    _common(p)
    p.add_argument("--host", help="listen address (default: review.host)")
    p.add_argument("--port", type=int, help="listen port (default: review.port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("users", help="review users")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    q = usub.add_parser("add", help="add a user (password from stdin when piped, else generated and printed once)")
    _common(q)
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["reviewer", "admin"])
    q.set_defaults(func=cmd_users)
    q = usub.add_parser("token", help="create an API token for a user (printed once)")
    _common(q)
    q.add_argument("name")
    q.add_argument("--label", default="api", help="what the token is for")
    q.set_defaults(func=cmd_users)
    q = usub.add_parser("list", help="list users")
    _common(q)
    q.set_defaults(func=cmd_users)

    p = sub.add_parser("drift", help="drift events and re-referencing")
    dsub = p.add_subparsers(dest="drift_command", metavar="ACTION", required=True)
    q = dsub.add_parser("events", help="list recent drift events as JSON lines")
    _common(q)
    q.add_argument("--stream")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_drift)
    q = dsub.add_parser(
        "rereference", help="acknowledge a change (e.g. a new policy version): the stream's detectors warm up again"
    )
    _common(q)
    q.add_argument("--stream", required=True)
    q.add_argument("--signal", help="only this signal (default: all)")
    q.add_argument("--reason", required=True)
    q.add_argument("--actor", default="cli")
    q.set_defaults(func=cmd_drift)

    p = sub.add_parser("rm", help="reward model: build preference pairs, train, evaluate")
    rsub = p.add_subparsers(dest="rm_command", metavar="ACTION", required=True)
    q = rsub.add_parser("pairs", help="write {prompt, chosen, rejected} pairs JSONL from the shared data or ratings")
    q.add_argument("--source", required=True, choices=["alpaca_eval", "hh_rlhf", "ratings"])
    q.add_argument("--out", required=True, metavar="FILE", help="pairs JSONL (gzip when it ends in .gz)")
    q.add_argument("--split", default="all", choices=["train", "test", "all"], help="held-out side, by prompt group")
    q.add_argument("--test-fraction", type=float, default=0.2, help="share of prompt groups on the test side")
    q.add_argument("--seed", type=int, default=0, help="split and AlpacaEval pair sampling seed")
    q.add_argument("--data-dir", metavar="DIR", help="shared data folder (default: ../shared/data)")
    q.add_argument("--ratings", metavar="FILE", help="--source ratings: the review export's ratings JSONL")
    q.add_argument("--pairs-per-instruction", type=int, default=4, help="alpaca_eval: model pairs per instruction")
    q.add_argument("--min-logit-margin", type=float, default=1.0, help="alpaca_eval: skip closer judge preferences")
    q.add_argument("--min-gap", type=float, default=1.0, help="ratings: smallest mean-rating gap that makes a pair")
    q.add_argument("--limit", type=int, help="keep the first N pairs")
    q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    q.set_defaults(func=cmd_rm)
    q = rsub.add_parser("train", help="train a reward-model version on pairs (Bradley-Terry)")
    q.add_argument("--pairs", required=True, metavar="FILE", help="training pairs JSONL")
    q.add_argument("--out", required=True, metavar="DIR", help="version directory to write")
    q.add_argument("--base", metavar="DIR", help="continue from this version (its parent in the metadata)")
    q.add_argument("--config", metavar="FILE", help="YAML training configuration")
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting (repeatable), e.g. --set epochs=2 --set max_length=256",
    )
    q.add_argument("--eval-pairs", metavar="FILE", help="also report held-out accuracy on these pairs")
    q.add_argument("--description", help="what the training data is (recorded in the model card)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    q.set_defaults(func=cmd_rm)
    q = rsub.add_parser("eval", help="pairwise accuracy of a version on pairs (JSON)")
    q.add_argument("--model", required=True, metavar="DIR", help="version directory")
    q.add_argument("--pairs", required=True, metavar="FILE", help="pairs JSONL")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    q.set_defaults(func=cmd_rm)

    q = rsub.add_parser(
        "update",
        help="run a reward-model update now: train on fresh labels, gate against the active version, promote or reject",
    )
    _common(q)
    g = q.add_mutually_exclusive_group()
    g.add_argument(
        "--request", metavar="ID", help="run this rm_update request (default: the oldest one waiting for a trainer)"
    )
    g.add_argument("--stream", help="by hand: the stream whose fresh labels drive the update")
    q.add_argument("--since", type=float, default=0.0, help="with --stream: event time where 'fresh' starts")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_rm)
    q = rsub.add_parser("register", help="add a version directory to the registry (optionally make it active)")
    _common(q)
    q.add_argument("--model", required=True, metavar="DIR", help="version directory (from rm train)")
    q.add_argument("--activate", action="store_true", help="promote it without a gate (bootstrap, rollback)")
    q.set_defaults(func=cmd_rm)
    q = rsub.add_parser("versions", help="list registered versions (JSON lines) and the active one")
    _common(q)
    q.set_defaults(func=cmd_rm)
    q = rsub.add_parser("requests", help="list reward-model update and retraining requests (JSON lines)")
    _common(q)
    q.add_argument("--kind", choices=["rm_update", "retrain"])
    q.add_argument("--state")
    q.set_defaults(func=cmd_rm)

    p = sub.add_parser("db", help="database migrations")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, helptext in (("upgrade", "apply all migrations"), ("current", "print the current revision")):
        q = dbsub.add_parser(name, help=helptext)
        _common(q)
        q.set_defaults(func=cmd_db)

    p = sub.add_parser("config", help="show or check the effective configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    for name, helptext in (
        ("show", "print the effective configuration (secrets redacted)"),
        ("check", "validate and exit"),
    ):
        q = csub.add_parser(name, help=helptext)
        _common(q)
        q.set_defaults(func=cmd_config)
    return parser


def _settings(args: argparse.Namespace, extra: list[str] | None = None) -> Settings:
    from monitor.config import load_settings

    overrides = list(extra or [])
    if getattr(args, "db", None):
        overrides.append(f"database.url={args.db}")
    if getattr(args, "dev", None):
        overrides.append("dev=true")
    overrides.extend(args.overrides)
    return load_settings(args.config, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    import threading

    from monitor.pipeline import Aborted
    from monitor.service import build_service, install_signal_handlers

    extra = []
    if args.input:
        extra += ["source.kind=stdin"] if args.input == "-" else ["source.kind=file", f"source.path={args.input}"]
    settings = _settings(args, extra)
    stop = threading.Event()
    # Before connecting anything: a SIGTERM during start-up is a clean stop too.
    install_signal_handlers(stop, settings.pipeline.drain_timeout_s)
    svc = build_service(settings)
    assert svc.server is not None
    log.info("serving /metrics, /healthz, /readyz at %s", svc.server.url)
    review = None
    if args.review:
        from monitor.review.app import create_app
        from monitor.review.server import BackgroundServer

        review = BackgroundServer(create_app(settings, svc.store), settings.review.host, settings.review.port).start()
        log.info("review UI at %s", review.url)
    worker = None
    if settings.actions.worker:
        from monitor.actions.worker import ActionWorker

        worker = ActionWorker(settings, svc.store, svc.metrics).start()
    try:
        stats = svc.pipeline.run(stop)
    except Aborted as e:
        log.warning("%s", e)
        return 3
    finally:
        if worker is not None:
            worker.stop()
        if review is not None:
            review.stop()
        svc.server.stop()
        svc.store.close()
    log.info("stopped after %d records (%d invalid)", stats.records, stats.invalid)
    return 0


def _replay(
    settings: Settings, path: str, progress: bool, name: str | None = None, desc: str = "replay"
) -> tuple[Any, dict[str, Any]]:
    import time

    from monitor.service import build_service, build_source

    source = build_source(settings, resume=False, name=name or f"replay:{path}")
    svc = build_service(settings, source=source, serve=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=desc, unit="ep", file=sys.stderr, total=_count_lines(path))
    t0 = time.perf_counter()
    pipe = svc.pipeline
    pipe.open()
    try:
        while True:
            records = pipe.source.poll(settings.pipeline.batch_size, 0.05)
            if records:
                pipe.process_batch(records)
                if bar is not None:
                    bar.update(len(records))
            elif pipe.source.exhausted:
                break
    finally:
        pipe.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    report = pipe.report()
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "episodes_per_s": round(report["episodes"] / elapsed, 1) if elapsed else None,
    }
    return svc, report


def _count_lines(path: str) -> int | None:
    import gzip

    if path == "-":
        return None
    with open(path, "rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def cmd_replay(args: argparse.Namespace) -> int:
    extra = ["source.kind=stdin"] if args.input == "-" else ["source.kind=file", f"source.path={args.input}"]
    settings = _settings(args, extra)
    if settings.sampling.key is None and not settings.dev:
        # Offline replays are reproducible with the built-in key; say so.
        log.warning("sampling.key is not set: replaying in dev mode with the built-in key")
        settings = _settings(args, [*extra, "dev=true"])
    svc, report = _replay(settings, args.input, args.progress)
    svc.store.close()
    with open(args.report, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=True)
        fh.write("\n")
    print(json.dumps({k: report[k] for k in ("episodes", "invalid", "sampled")}))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from monitor.simulate import BUNDLED_CONFIG, bundled, run_simulation

    if args.config is None:
        args.config = str(bundled(BUNDLED_CONFIG))
    settings = _settings(args, ["source.kind=file", f"source.path={args.input}"])
    report = run_simulation(settings, args.input, progress=not args.no_progress, review_port=args.review_port)
    with open(args.report, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    print(
        json.dumps(
            {
                "drift_events": len(report["drift_events"]),
                "labels": report["labels_collected"]["total"],
                "rm_versions": [(v["version"], v["status"]) for v in report["rm_versions"]],
                "retrain_requests": len(report["retrain_requests"]),
            }
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo

    return run_demo(args)


def _parse_time(value: str | None) -> float | None:
    if value is None:
        return None
    from monitor.episodes import InvalidEpisode, parse_timestamp

    try:
        return parse_timestamp(float(value)) if value.replace(".", "", 1).isdigit() else parse_timestamp(value)
    except InvalidEpisode as e:
        raise SystemExit(f"oversight: bad time {value!r}: {e.detail}") from None


def cmd_estimate(args: argparse.Namespace) -> int:
    from monitor.estimates import estimate_stream
    from monitor.store import Store

    settings = _settings(args)
    store = Store(settings.database.url, migrate=settings.database.migrate)
    try:
        est = estimate_stream(
            store,
            args.stream,
            args.channel,
            args.quantity,
            _parse_time(args.since),
            _parse_time(args.until),
            args.confidence,
        )
    finally:
        store.close()
    print(json.dumps(est, indent=2, sort_keys=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from monitor.review.app import create_app

    settings = _settings(args)
    app = create_app(settings)
    host = args.host or settings.review.host
    port = args.port if args.port is not None else settings.review.port
    log.info("review UI at http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False, server_header=False)
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from monitor.review import auth
    from monitor.store import Store

    settings = _settings(args)
    store = Store(settings.database.url, migrate=settings.database.migrate)
    try:
        if args.users_command == "list":
            for u in auth.list_users(store):
                print(f"{u.name}\t{u.role}")
            return 0
        if args.users_command == "token":
            user = auth.find_user(store, args.name)
            if user is None:
                print(f"oversight: no user {args.name!r}", file=sys.stderr)
                return 1
            print(auth.create_api_token(store, user, args.label))
            return 0
        generated = sys.stdin.isatty()
        password = auth.generate_password() if generated else sys.stdin.readline().rstrip("\r\n")
        try:
            auth.create_user(store, args.name, args.role, password)
        except ValueError as e:
            print(f"oversight: {e}", file=sys.stderr)
            return 1
        print(f"added {args.role} {args.name}")
        if generated:
            print(f"password (shown once): {password}")
        return 0
    finally:
        store.close()


def cmd_drift(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from monitor.drift import request_rereference
    from monitor.store import Store
    from monitor.store import tables as t

    settings = _settings(args)
    store = Store(settings.database.url, migrate=settings.database.migrate)
    try:
        if args.drift_command == "rereference":
            rid = request_rereference(store, args.stream, args.signal, args.reason, args.actor)
            print(json.dumps({"request": rid, "stream": args.stream, "signal": args.signal, "status": "pending"}))
            return 0
        e = t.drift_events
        q = sa.select(e).order_by(e.c.id.desc()).limit(max(1, min(args.limit, 10_000)))
        if args.stream:
            q = q.where(e.c.stream == args.stream)
        with store.engine.connect() as conn:
            for row in conn.execute(q):
                print(json.dumps(dict(row._mapping), ensure_ascii=True, sort_keys=True))
        return 0
    finally:
        store.close()


def cmd_rm(args: argparse.Namespace) -> int:
    if args.rm_command == "pairs":
        return _rm_pairs(args)
    if args.rm_command == "train":
        return _rm_train(args)
    if args.rm_command in ("update", "register", "versions", "requests"):
        return _rm_registry(args)
    from monitor.reward.train import evaluate

    pairs = _read_pairs(args.pairs)
    model = _load_rm(args.model)
    print(json.dumps(evaluate(model, pairs, batch_size=args.batch_size), sort_keys=True))
    return 0


def _load_rm(path: str) -> Any:
    from monitor.config import ConfigError
    from monitor.reward.model import RewardModel

    try:
        return RewardModel.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load reward model {path}: {e}") from None


def _rm_registry(args: argparse.Namespace) -> int:
    from monitor.actions import requests as rq
    from monitor.config import ConfigError
    from monitor.reward.registry import Registry
    from monitor.store import Store

    _setup_logging(args.log_level)
    settings = _settings(args)
    store = Store(settings.database.url, migrate=settings.database.migrate)
    registry = Registry(store, settings.reward.models_dir, settings.reward.stream_set)
    try:
        if args.rm_command == "versions":
            active = registry.active()
            for row in registry.versions():
                row["active"] = active is not None and row["version"] == active[0]
                print(json.dumps(row, ensure_ascii=True, sort_keys=True, default=str))
            return 0
        if args.rm_command == "requests":
            for row in rq.listing(store, kind=args.kind, state=args.state):
                print(json.dumps(row, ensure_ascii=True, sort_keys=True, default=str))
            return 0
        if args.rm_command == "register":
            from monitor.reward.model import RewardModel

            try:
                model = RewardModel.load(args.model)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load {args.model}: {e}") from None
            version = registry.register(
                model, data_window=model.metadata.get("training", {}), metrics=model.metadata.get("metrics", {})
            )
            out: dict[str, Any] = {"version": version, "active": False}
            if args.activate:
                out["generation"] = registry.promote(version, {"passed": True, "reason": "activated by hand"})
                out["active"] = True
            print(json.dumps(out, sort_keys=True))
            return 0
        return _rm_update(args, settings, store)
    finally:
        store.close()


def _rm_update(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    from monitor.actions import requests as rq
    from monitor.config import ConfigError
    from monitor.reward.update import UpdateError, run_update

    if not args.request and not args.stream:
        waiting = [r for r in rq.listing(store, kind="rm_update") if r["state"] in ("sent", "pending")]
        if not waiting:
            print(json.dumps({"request": None, "state": "nothing to do"}))
            return 0
        args.request = waiting[-1]["id"]  # listing is newest first
    if args.request:
        req = rq.get(store, args.request)
        if req is None or req["kind"] != "rm_update":
            raise ConfigError(f"no rm_update request {args.request!r}")
        if req["state"] in ("done", "failed"):
            print(json.dumps({"request": req["id"], "state": req["state"], "result": req["result"]}, default=str))
            return 0
        # A request handed to a trainer (Kafka, webhook, Kubernetes Job) was marked sent; a
        # local one is pending. Either way only one runner wins the claim.
        if not (rq.claim(store, req["id"], "sent", "running") or rq.claim(store, req["id"], "pending", "running")):
            raise ConfigError(f"request {req['id']} is {req['state']}: another trainer has it")
        stream, since = req["payload"]["stream"], float(req["payload"]["since"])
    else:
        stream, since = args.stream, args.since
    try:
        result = run_update(
            settings, store, stream=stream, since=since, request_id=args.request, progress=not args.no_progress
        )
    except UpdateError as e:
        if args.request:
            rq.finish(store, args.request, "failed", error=str(e))
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 1
    if args.request:
        rq.finish(store, args.request, "done", result=result)
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def _read_pairs(path: str) -> list[dict[str, Any]]:
    from monitor.config import ConfigError
    from monitor.reward.data import read_pairs

    try:
        return read_pairs(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read pairs: {e}") from None


def _rm_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor.config import ConfigError
    from monitor.reward import data

    root = Path(args.data_dir) if args.data_dir else data.default_data_dir()
    if args.source == "alpaca_eval":
        pairs = data.alpaca_eval_pairs(
            root / "alpaca_eval",
            pairs_per_instruction=args.pairs_per_instruction,
            min_logit_margin=args.min_logit_margin,
            seed=args.seed,
        )
    elif args.source == "hh_rlhf":
        pairs = data.hh_rlhf_pairs(root / "hh_rlhf" / "harmless-base-test.jsonl.gz")
    else:
        if not args.ratings:
            raise ConfigError("--source ratings needs --ratings FILE")
        with open(args.ratings, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        pairs = data.pairs_from_ratings(records, min_gap=args.min_gap)
    if args.split != "all":
        pairs = [p for p in pairs if data.split_of(data.group_of(p), args.test_fraction, args.seed) == args.split]
    if args.limit is not None:
        pairs = pairs[: args.limit]
    n = data.write_pairs(pairs, args.out)
    print(json.dumps({"pairs": n, "out": args.out, "source": args.source, "split": args.split}))
    return 0


def _rm_train(args: argparse.Namespace) -> int:
    from monitor.reward.train import evaluate, load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    pairs = _read_pairs(args.pairs)
    eval_pairs = _read_pairs(args.eval_pairs) if args.eval_pairs else None
    base = _load_rm(args.base) if args.base else None
    model, metrics = train(
        pairs, cfg, base=base, progress=not args.no_progress, description=args.description or f"pairs from {args.pairs}"
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


def cmd_db(args: argparse.Namespace) -> int:
    from monitor.store import Store

    settings = _settings(args)
    store = Store(settings.database.url, migrate=args.db_command == "upgrade")
    print(store.revision() or "none")
    store.close()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.config_command == "show":
        print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    else:
        settings.sampling_policy()
        print("configuration is valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from monitor import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "log_level", "INFO"))
    from monitor.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"oversight: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
