"""``oversight serve`` and ``oversight users add | token | list | revoke``: human review."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from monitor.cli.common import Command, open_existing_store, open_store, port, print_json, settings_from_args
from monitor.errors import UsageError

if TYPE_CHECKING:
    from monitor.review.auth import User
    from monitor.store import Store

log = logging.getLogger("oversight")


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="listen address (default: review.host)")
    p.add_argument("--port", type=port, help="listen port (default: review.port)")


def cmd_serve(args: argparse.Namespace) -> int:
    from monitor.review.server import serve

    # The review UI on --host/--port, its /metrics on review.metrics_host/metrics_port.
    serve(settings_from_args(args), args.host, args.port)
    return 0


def read_password() -> tuple[str, bool]:
    """(password, generated?). A terminal or an empty stdin (EOF, e.g. ``</dev/null`` or a
    container without input) gets a generated password; a piped line is the password."""
    if sys.stdin is None or sys.stdin.isatty():
        return _generated(), True
    # At most a password's length and its line end: a stdin of /dev/zero was read until memory ran out.
    from monitor.review.auth import MAX_PASSWORD

    line = sys.stdin.readline(MAX_PASSWORD + 3)
    if line == "":
        return _generated(), True
    password = line.rstrip("\r\n")
    if len(password) > MAX_PASSWORD:
        raise UsageError(f"the password on stdin is longer than {MAX_PASSWORD} characters")
    try:  # bytes that are not UTF-8 arrive as lone surrogates: no hash or login form takes those
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the password on stdin is not UTF-8 text") from None
    return password, False


def _generated() -> str:
    from monitor.review import auth

    return auth.generate_password()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="login name (letters, digits, '.', '_' or '-')")
    p.add_argument("--role", required=True, choices=["reviewer", "admin"], help="what the user may do")


def cmd_users_add(args: argparse.Namespace) -> int:
    from monitor.review import auth

    settings = settings_from_args(args)
    password, generated = read_password()
    store = open_store(settings)
    try:
        auth.create_user(store, args.name, args.role, password)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        store.close()
    print(f"added {args.role} {args.name}")
    if generated:
        print(f"password (shown once): {password}")
    return 0


def token_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the user the token acts as")
    p.add_argument("--label", default="api", help="what the token is for (revoke by this label later)")


def named_user(store: Store, name: str) -> User:
    from monitor.review import auth

    user = auth.find_user(store, name)
    if user is None:
        raise UsageError(f"no user {json.dumps(name)}")
    return user


def cmd_users_token(args: argparse.Namespace) -> int:
    from monitor.review import auth

    store = open_existing_store(settings_from_args(args))
    try:
        user = named_user(store, args.name)
        token = auth.create_api_token(store, user, args.label)
    finally:
        store.close()
    print(token)
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from monitor.review import auth

    store = open_existing_store(settings_from_args(args))
    try:
        users = auth.list_users(store)
    finally:
        store.close()
    for u in users:
        print(f"{u.name}\t{u.role}")
    return 0


def revoke_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the user whose API tokens are revoked")
    p.add_argument("--label", help="only the tokens with this label (default: all of the user's tokens)")


def cmd_users_revoke(args: argparse.Namespace) -> int:
    from monitor.review import auth

    store = open_existing_store(settings_from_args(args))
    try:
        named_user(store, args.name)
        revoked = auth.revoke_api_tokens(store, args.name, label=args.label)
    finally:
        store.close()
    print_json({"user": args.name, "label": args.label, "revoked": revoked})
    return 0


COMMANDS = (
    Command(("serve",), "run the review web UI and API", cmd_serve, serve_arguments),
    Command(
        ("users", "add"),
        "add a user (password from stdin when a line is piped, else generated and printed once)",
        cmd_users_add,
        add_arguments,
    ),
    Command(("users", "token"), "create an API token for a user (printed once)", cmd_users_token, token_arguments),
    Command(("users", "list"), "list users", cmd_users_list),
    Command(
        ("users", "revoke"),
        "revoke a user's API tokens (all, or those with one label)",
        cmd_users_revoke,
        revoke_arguments,
    ),
)
