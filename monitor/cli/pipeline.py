"""``oversight run | infer | replay | simulate | demo``: the pipeline over a source, and its inference workers."""

from __future__ import annotations

import argparse
import json
import logging

from monitor.cli.common import (
    EXIT_ABORTED,
    Command,
    InputFile,
    OutputDir,
    OutputFile,
    ended_early,
    input_overrides,
    port,
    progress_of,
    settings_from_args,
    write_json,
)
from monitor.errors import UsageError, require_readable

log = logging.getLogger("oversight")


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        metavar="FILE",
        type=InputFile,
        help="shortcut for --set source.kind=file --set source.path=FILE ('-' for stdin)",
    )
    p.add_argument("--review", action="store_true", help="also serve the review UI and API in this process")


def cmd_run(args: argparse.Namespace) -> int:
    import threading

    from monitor.pipeline import Aborted
    from monitor.service import build_service, install_signal_handlers
    from monitor.sources.file import file_input_error
    from monitor.startup import StartingServer, open_store

    settings = settings_from_args(args, input_overrides(args.input) if args.input else [])
    if settings.source.kind == "file" and settings.source.path and not args.input:
        require_readable(settings.source.path, "source.path")
    stop = threading.Event()
    # Before connecting anything: a SIGTERM during start-up is a clean stop too.
    install_signal_handlers(stop, settings.pipeline.drain_timeout_s)
    starting = StartingServer(settings.server.host, settings.server.port)
    try:
        store = open_store(settings.database, stop)
    except BaseException:
        starting.stop()
        raise
    starting.database_open()
    try:
        service = build_service(settings, store=store, server=starting.server)
    except BaseException:
        starting.stop()
        store.close()
        raise
    try:
        with service as svc:
            assert svc.server is not None
            log.info("serving /metrics, /healthz, /readyz at %s", svc.server.url)
            if args.review:
                log.info("review UI at %s", svc.serve_review().url)
            if settings.actions.worker:
                svc.action_worker(start=True)
            if settings.database.retention.days is not None:
                svc.retention_job()
            try:
                stats = svc.run(stop)
            except Aborted as e:
                log.warning("%s", e)
                return EXIT_ABORTED
            error = file_input_error(svc.pipeline.source)
    finally:
        store.close()  # after the service's parts: it was given the store, so it leaves it open
    log.info("stopped after %d records (%d invalid, %d duplicates)", stats.records, stats.invalid, stats.duplicates)
    ended_early(error, stats.records)
    return 0


def infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port", type=port, default=9109, help="port of /metrics, /healthz and /readyz on server.host (default 9109)"
    )


def cmd_infer(args: argparse.Namespace) -> int:
    import threading

    from monitor.ops import ReadinessCollector
    from monitor.service import install_signal_handlers
    from monitor.service.infer import InferenceWorker
    from monitor.startup import StartingServer, open_store

    settings = settings_from_args(args)
    if not settings.inference.external:
        # Both would compute the same samples: the pipeline's threads and this process.
        log.warning("inference.external is false: `oversight run` computes too (set it for the pipeline)")
    stop = threading.Event()
    install_signal_handlers(stop, settings.pipeline.drain_timeout_s)
    starting = StartingServer(settings.server.host, args.port)
    try:
        store = open_store(settings.database, stop)
        starting.database_open()
        worker = InferenceWorker(settings, store)
    except BaseException:
        starting.stop()
        raise
    server = starting.server
    worker.registry.register(ReadinessCollector(worker.readiness))
    server.serve(worker.registry, worker.readiness)
    log.info("inference worker %s: serving /metrics, /healthz, /readyz at %s", worker.id, server.url)
    try:
        worker.warm()
        log.info("inference worker %s: stages %s", worker.id, ", ".join(s.name for s in worker.stages) or "none")
        worker.run(stop)
    finally:
        worker.close()
        server.stop()
    log.info("inference worker %s stopped", worker.id)
    return 0


def replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", required=True, metavar="FILE", type=InputFile, help="JSONL episodes (plain or gzip; '-' for stdin)"
    )
    p.add_argument(
        "--report", required=True, metavar="REPORT.json", type=OutputFile, help="where the JSON report is written"
    )


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.service.replay import replay_file

    extra = input_overrides(args.input)
    settings = settings_from_args(args, extra)
    if settings.sampling.key is None and not settings.dev:
        # Offline replays are reproducible with the built-in key; say so.
        log.warning("sampling.key is not set: replaying in dev mode with the built-in key")
        settings = settings_from_args(args, [*extra, "dev=true"])
    report = replay_file(settings, args.input, progress=progress_of(args))
    write_json(args.report, report)
    print(json.dumps({k: report[k] for k in ("episodes", "invalid", "duplicates", "sampled")}))
    ended_early(report.get("input_error"), report["episodes"])
    return 0


def simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        type=InputFile,
        help="JSONL episodes (plain or gzip) whose metadata carries the simulated reviewers' answers",
    )
    p.add_argument(
        "--report", required=True, metavar="REPORT.json", type=OutputFile, help="where the JSON report is written"
    )
    p.add_argument("--review-port", type=port, default=0, help="port of the review UI while it runs (0: any free)")


def cmd_simulate(args: argparse.Namespace) -> int:
    from monitor.simulate import BUNDLED_CONFIG, bundled, run_simulation

    if args.input == "-":
        raise UsageError("--input: the simulation reads its input twice (the answers, then the episodes): give a file")
    if args.config is None:
        args.config = str(bundled(BUNDLED_CONFIG))
    settings = settings_from_args(args, input_overrides(args.input))
    report = run_simulation(settings, args.input, progress=progress_of(args), review_port=args.review_port)
    write_json(args.report, report)
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


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        default=".oversight-demo",
        type=OutputDir,
        help="where the demo keeps its database, models and dead letters (emptied at start)",
    )
    p.add_argument("--port", type=port, default=9108, help="port of /metrics, /healthz, /readyz")
    p.add_argument("--review-port", type=port, default=8080, help="port of the review UI")
    p.add_argument(
        "--exit-after-replay", action="store_true", help="exit after the summary instead of serving until Ctrl-C"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from monitor.simulate.demo import run_demo

    return run_demo(
        config=args.config,
        overrides=args.overrides,
        workdir=args.workdir,
        port=args.port,
        review_port=args.review_port,
        exit_after_replay=args.exit_after_replay,
        progress=progress_of(args),
    )


COMMANDS = (
    Command(
        ("run",),
        "run the pipeline as a service (source -> validate -> sample -> store)",
        cmd_run,
        run_arguments,
    ),
    Command(
        ("infer",),
        "run the inference workers as a process of their own (inference.external: embed and score the waiting samples)",
        cmd_infer,
        infer_arguments,
    ),
    Command(
        ("replay",),
        "run the pipeline over a file as fast as possible and write a report",
        cmd_replay,
        replay_arguments,
        ("settings", "db", "progress"),
    ),
    Command(
        ("simulate",),
        "the closed loop over an episode file: drift -> boosted review by a simulated reviewer pool"
        " -> reward-model update -> retraining request",
        cmd_simulate,
        simulate_arguments,
        ("settings", "db", "progress"),
    ),
    Command(
        ("demo",),
        "the closed loop (simulate) on the bundled real traffic, with the review UI and /metrics live",
        cmd_demo,
        demo_arguments,
        ("settings", "progress"),
    ),
)
