"""``oversight ingest serve`` and ``oversight ingest tokens add | list | revoke``: the HTTP ingest API."""

from __future__ import annotations

import argparse
import json

from monitor.cli.common import Command, open_existing_store, open_store, port, print_json, settings_from_args
from monitor.errors import UsageError


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="listen address (default: ingest.host)")
    p.add_argument("--port", type=port, help="listen port (default: ingest.port; 0 picks a free one)")


def cmd_serve(args: argparse.Namespace) -> int:
    from monitor.ingest.server import serve

    serve(settings_from_args(args), args.host, args.port)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="token name (letters, digits, '.', '_' or '-'); revoke by it later")
    p.add_argument(
        "--stream",
        dest="streams",
        action="append",
        metavar="S",
        help="a stream the token may write (repeatable; default: every stream)",
    )


def cmd_tokens_add(args: argparse.Namespace) -> int:
    from monitor.ingest.tokens import add_token

    store = open_store(settings_from_args(args))
    try:
        token = add_token(store, args.name, args.streams)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        store.close()
    # The token alone on stdout (``TOKEN=$(oversight ingest tokens add app)``); it is shown once.
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from monitor.ingest.tokens import list_tokens

    store = open_existing_store(settings_from_args(args))
    try:
        rows = list_tokens(store)
    finally:
        store.close()
    for r in rows:
        streams = "*" if r.streams is None else ",".join(json.dumps(s, ensure_ascii=True) for s in r.streams)
        state = "active" if r.revoked_at is None else "revoked"
        print(f"{r.name}\t{state}\t{streams}")
    return 0


def revoke_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the token to revoke")


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from monitor.ingest.tokens import revoke_token

    store = open_existing_store(settings_from_args(args))
    try:
        revoked = revoke_token(store, args.name)
    finally:
        store.close()
    if not revoked:
        raise UsageError(f"no active ingest token {json.dumps(args.name, ensure_ascii=True)}")
    print_json({"token": args.name, "revoked": True})
    return 0


COMMANDS = (
    Command(
        ("ingest", "serve"), "run the HTTP ingest API (POST /v1/episodes, POST /v1/traces)", cmd_serve, serve_arguments
    ),
    Command(("ingest", "tokens", "add"), "create an ingest bearer token (printed once)", cmd_tokens_add, add_arguments),
    Command(
        ("ingest", "tokens", "list"), "list ingest tokens (names, state, streams; never the tokens)", cmd_tokens_list
    ),
    Command(("ingest", "tokens", "revoke"), "revoke an ingest token", cmd_tokens_revoke, revoke_arguments),
)
