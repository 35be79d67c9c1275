"""`rlhf annotate import | serve | add-user | export`.

The main CLI calls :func:`main` with the arguments after `annotate`. Importing this module is
cheap: Flask, SQLAlchemy and the HTTP server load inside the command that needs them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rlhf.annotate import KEY_ENV

DEFAULT_DB = "sqlite:///annotations.db"  # a SQLite file in the current folder
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf annotate",
        description="Collect human preference labels on pairs of responses, for `rlhf reward` "
        "and `rlhf dpo`.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=DEFAULT_DB,
        metavar="URL",
        help="database URL (default: %(default)s, a SQLite file in the current folder; "
        "e.g. postgresql://user:pass@host/db for a team)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("import", parents=[common], help="add pairs from a candidates JSONL file")
    p.add_argument("candidates", type=Path, metavar="CANDIDATES.jsonl",
                   help='lines of {"prompt": ..., "responses": [two or more]}; every pair of '
                   "responses becomes a comparison; pairs already imported are skipped")

    p = sub.add_parser("serve", parents=[common], help="run the annotation web app")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=3,
                   help="annotators per pair (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=8,
                   help="worker threads (default: %(default)s)")
    p.add_argument("--lease-minutes", type=float, default=60.0,
                   help="an unanswered pair goes back to the pool after this long (default: %(default)s)")
    p.add_argument("--question", default="Which response is better?",
                   help='the question shown above the pair, e.g. "Which is better for a 10-year-old?"')
    p.add_argument("--secure-cookies", action=argparse.BooleanOptionalAction, default=None,
                   help="browsers send the login cookie over HTTPS only (default: on unless --host is loopback; "
                   "serve behind an HTTPS proxy then, or pass --no-secure-cookies on a network you trust)")
    p.add_argument("--session-idle-hours", type=float, default=24.0,
                   help="a login unused this long ends (default: %(default)s; every login ends after 14 days)")
    p.add_argument("--key-file", metavar="PATH",
                   help="the cookie-signing key's file, made on first start with mode 0600 (default: the SQLite "
                   f"file's name + .key, or ./annotate.key; ${KEY_ENV} overrides it)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="Host header names answered, comma-separated (default: loopback names on a loopback "
                   "--host, else any); the name people use to reach the server")

    p = sub.add_parser("add-user", parents=[common], help="create an annotator and print their login link")
    p.add_argument("name", help="letters, digits, '.', '_' or '-'; up to 64 characters")
    p.add_argument("--admin", action="store_true", help="may open the admin page")
    p.add_argument("--reset", action="store_true",
                   help="the user exists: issue a new link (the old link and sessions stop working)")
    p.add_argument("--link-days", type=float, default=7.0,
                   help="the link logs in once, within this many days (default: %(default)s)")
    p.add_argument("--host", default=DEFAULT_HOST, help="host to put in the link (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to put in the link (default: %(default)s)")

    p = sub.add_parser("export", parents=[common], help="write majority-vote preferences as JSONL")
    p.add_argument("--out", type=Path, required=True, help="output file (prompt/chosen/rejected lines)")
    p.add_argument("--min-labels", type=positive_int, default=1,
                   help="skip pairs with fewer labels than this (default: %(default)s)")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def cmd_import(args: argparse.Namespace) -> int:
    from rlhf.annotate import store
    from rlhf.annotate.candidates import pairs_of, read_candidates

    candidates = read_candidates(args.candidates)
    specs = [spec for candidate in candidates for spec in pairs_of(candidate)]
    engine = store.open_store(args.db)
    result = store.import_pairs(engine, specs, source=str(args.candidates))
    print(
        f"{args.candidates}: {len(candidates)} prompts, {len(specs)} pairs; "
        f"added {result.added}, skipped {result.already_present} already in {store.display_url(args.db)}"
    )
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    from rlhf.annotate import store
    from rlhf.annotate.errors import AnnotateError

    if not USER_NAME.fullmatch(args.name):
        raise AnnotateError(
            f"user name {args.name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(up to 64 characters, starting with a letter or digit)."
        )
    from datetime import timedelta

    if args.link_days <= 0:
        raise AnnotateError(f"--link-days must be above 0, got {args.link_days}")
    engine = store.open_store(args.db)
    token = store.add_user(engine, args.name, admin=args.admin, reset=args.reset,
                           link_lifetime=timedelta(days=args.link_days))
    role = "admin" if args.admin else "annotator"
    print(f"{role} {args.name}: personal login link (keep it private; it is shown only once; "
          f"it logs in once, within {args.link_days:g} days):")
    print(f"http://{link_host(args.host)}:{args.port}/login/{token}")
    return 0


def link_host(host: str) -> str:
    """A link to 0.0.0.0 does not open in a browser; IPv6 literals need brackets."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def cmd_export(args: argparse.Namespace) -> int:
    from rlhf.annotate import store
    from rlhf.annotate.errors import AnnotateError
    from rlhf.annotate.export import majority_records, write_jsonl

    engine = store.open_store(args.db)
    report = majority_records(engine, min_labels=args.min_labels)
    try:
        write_jsonl(report.records, args.out)
    except OSError as error:
        raise AnnotateError(f"cannot write {args.out}: {error.strerror}") from None
    print(report.summary(args.out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from a2wsgi import WSGIMiddleware

    from rlhf import httpd
    from rlhf.annotate import store
    from rlhf.annotate.errors import AnnotateError
    from rlhf.annotate.web import MAX_BODY_BYTES, create_app

    if args.session_idle_hours <= 0:
        raise AnnotateError(f"--session-idle-hours must be above 0, got {args.session_idle_hours}")
    secure = secure_cookies(args)
    app = create_app(args.db, k=args.k, lease_minutes=args.lease_minutes, question=args.question,
                     secure_cookies=secure, session_idle_hours=args.session_idle_hours, key_file=args.key_file)
    # Flask runs in a pool of worker threads; the body reaches it whole (bounded in size and time) or not at all
    served = httpd.protect(WSGIMiddleware(app, workers=args.threads), args.host, MAX_BODY_BYTES,
                           hosts=args.allowed_hosts)
    try:
        listener = httpd.Listener(served, args.host, args.port)
    except OSError as error:
        raise AnnotateError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    print(
        f"annotate: serving http://{link_host(args.host)}:{listener.port}/ "
        f"(database {store.display_url(args.db)}, k={args.k}); admin page at /admin",
        flush=True,
    )
    if secure:
        print("annotate: login cookies are Secure: browsers send them over HTTPS only. Serve behind an HTTPS "
              "proxy, or pass --no-secure-cookies on a network you trust.", flush=True)
    listener.run()
    return 0


def secure_cookies(args: argparse.Namespace) -> bool:
    """--secure-cookies, or by default: on unless the server listens on loopback only (then plain http is fine)."""
    from rlhf.httpd import is_loopback

    return not is_loopback(args.host) if args.secure_cookies is None else args.secure_cookies


COMMANDS = {"import": cmd_import, "serve": cmd_serve, "add-user": cmd_add_user, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Run one annotate command; returns the exit status (0 ok, 2 usage or input error)."""
    from rlhf.annotate.errors import AnnotateError

    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        return COMMANDS[args.command](args)
    except AnnotateError as error:
        print(f"rlhf annotate {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if not is_database_error(error):
            raise
        print(f"rlhf annotate {args.command}: database error: {error}", file=sys.stderr)
        return 1


def is_database_error(error: Exception) -> bool:
    """SQLAlchemy errors (server gone, disk full, locked...) get a message, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(error, SQLAlchemyError)


if __name__ == "__main__":
    sys.exit(main())
