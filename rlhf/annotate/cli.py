"""`rlhf annotate import | serve | add-user | export`.

The main CLI calls :func:`main` with the arguments after `annotate`. Importing this module is
cheap: Flask, SQLAlchemy and waitress load inside the command that needs them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

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

    p = sub.add_parser("add-user", parents=[common], help="create an annotator and print their login link")
    p.add_argument("name", help="letters, digits, '.', '_' or '-'; up to 64 characters")
    p.add_argument("--admin", action="store_true", help="may open the admin page")
    p.add_argument("--reset", action="store_true",
                   help="the user exists: issue a new link (the old link and sessions stop working)")
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
    engine = store.open_store(args.db)
    token = store.add_user(engine, args.name, admin=args.admin, reset=args.reset)
    role = "admin" if args.admin else "annotator"
    print(f"{role} {args.name}: personal login link (keep it private; it is shown only once):")
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
    from rlhf.annotate import store
    from rlhf.annotate.errors import AnnotateError
    from rlhf.annotate.web import create_app

    try:
        import waitress
    except ModuleNotFoundError:
        raise AnnotateError("serve needs the waitress package: pip install 'waitress>=3.0'") from None
    app = create_app(args.db, k=args.k, lease_minutes=args.lease_minutes, question=args.question)
    print(
        f"annotate: serving http://{link_host(args.host)}:{args.port}/ "
        f"(database {store.display_url(args.db)}, k={args.k}); admin page at /admin",
        flush=True,
    )
    try:
        waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="rlhf-annotate")
    except OSError as error:
        raise AnnotateError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    return 0


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
