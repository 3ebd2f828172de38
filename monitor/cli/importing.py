"""``oversight import --input FILE``: episodes exported by other tools (OpenAI chat JSONL, Langfuse traces)
through the same validation, dead letters and pipeline as ``oversight replay``."""

from __future__ import annotations

import argparse
import json
import logging
import time

from monitor.cli.common import (
    Command,
    InputFile,
    OutputFile,
    ended_early,
    input_overrides,
    settings_from_args,
    write_json,
)
from monitor.errors import UsageError

log = logging.getLogger("oversight")
FORMATS = ("auto", "openai-chat", "langfuse")  # monitor.ingest.formats.FORMATS, without importing it for --help


def import_arguments(p: argparse.ArgumentParser) -> None:
    # A flag, not a positional: every path argument of the CLI is a --long-option (check_paths).
    p.add_argument(
        "--input", required=True, metavar="FILE", type=InputFile, help="JSONL export (plain or gzip; '-' for stdin)"
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: decided per line)")
    p.add_argument("--stream", metavar="S", help="stream of the episodes whose line names none (default: default)")
    p.add_argument("--report", metavar="REPORT.json", type=OutputFile, help="also write the pipeline's JSON report")


def cmd_import(args: argparse.Namespace) -> int:
    from monitor.episodes.validate import stream_name_error
    from monitor.ingest.formats import ConvertingSource
    from monitor.pipeline import LoopHooks
    from monitor.service.build import build_dead_letters, build_service, build_source
    from monitor.sources.file import file_input_error

    if args.stream is not None and (why := stream_name_error(args.stream)) is not None:
        # Before a record is read: every line without a stream would otherwise be dead-lettered.
        raise UsageError(f"--stream {args.stream!r}: {why}")
    extra = input_overrides(args.input)
    settings = settings_from_args(args, extra)
    if settings.sampling.key is None and not settings.dev:
        log.warning("sampling.key is not set: importing in dev mode with the built-in key")
        settings = settings_from_args(args, [*extra, "dev=true"])
    sink = build_dead_letters(settings)
    inner = build_source(settings, resume=False, name=f"import:{args.input}")
    source = ConvertingSource(inner, args.format, sink, stream=args.stream)
    t0 = time.perf_counter()
    # The pipeline closes the sink when it stops.
    with build_service(settings, source=source, serve=False, dead_letters=sink) as svc:
        svc.run(hooks=LoopHooks(stage_idle_work=False))
        report = svc.pipeline.report()
    report["unconvertible"] = source.unconvertible
    report["timing"] = {"seconds": round(time.perf_counter() - t0, 3)}
    if (error := file_input_error(inner)) is not None:
        report["input_error"] = error
    if args.report:
        write_json(args.report, report)
    summary = {k: report[k] for k in ("episodes", "invalid", "duplicates", "sampled", "unconvertible")}
    print(json.dumps(summary))
    ended_early(report.get("input_error"), report["episodes"])
    return 0


COMMANDS = (
    Command(
        ("import",),
        "import an export of other tools (OpenAI chat JSONL, Langfuse traces) through validation and the pipeline",
        cmd_import,
        import_arguments,
        ("settings", "db"),
    ),
)
