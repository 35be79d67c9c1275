"""Storage for pairs, annotators and labels, through SQLAlchemy Core.

SQLite (one file, write-ahead logging) is the default; a PostgreSQL URL works unchanged for
teams. The schema is created on first use. Two rules keep the data right under concurrency:

* a label lives in its assignment row and is written with ``... WHERE choice IS NULL``, so a
  label is stored at most once and the server only acknowledges it after the commit;
* a pair's ``n_assigned`` counter is raised with ``... WHERE n_assigned < k``, a single-row
  atomic update on both databases, so no pair is handed to more than k annotators, and the
  unique (pair, user) constraint means nobody sees the same pair twice.

Credentials: the database holds no secret that lets its reader act as a user. Login links and
session ids are 256 random bits of which only the sha256 is stored; the cookie-signing key lives
outside the database (`signing_key`: a 0600 key file next to a SQLite file, or an environment
variable); a SQLite database and its key file are created readable by their owner only (0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import stat
from collections import namedtuple
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    func,
    select,
)
from sqlalchemy.engine import make_url

from rlhf.annotate import KEY_ENV
from rlhf.annotate.candidates import PairSpec, Prompt
from rlhf.annotate.errors import AnnotateError

CHOICES = ("a", "b", "tie", "both_bad")
POSITIONS = ("left", "right", "tie", "both_bad")
LINK_LIFETIME = timedelta(days=7)  # a login link not used within this stops working
SESSION_LIFETIME = timedelta(days=14)  # a session ends this long after its login, however active
SEEN_EVERY = timedelta(minutes=1)  # a session's last-seen time is written at most this often (a write per page is slow)

metadata = MetaData()

users = Table(
    "annotate_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    # sha256 hex of the latest login link's token; never the token. Logins go through `links` below.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
)

pairs = Table(
    "annotate_pairs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),  # see candidates.pair_key
    Column("prompt_json", Text, nullable=False),  # JSON, so a message list exports as it came in
    Column("response_a", Text, nullable=False),
    Column("response_b", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("n_assigned", Integer, nullable=False, default=0),
    Column("created_at", DateTime, nullable=False),
)

assignments = Table(
    "annotate_assignments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("pair_id", Integer, ForeignKey("annotate_pairs.id"), nullable=False),
    Column("user_id", Integer, ForeignKey("annotate_users.id"), nullable=False),
    Column("a_on_left", Boolean, nullable=False),  # the randomised display order, recorded
    Column("assigned_at", DateTime, nullable=False),
    Column("choice", String(8)),  # a / b / tie / both_bad, about response_a/response_b; NULL = open
    Column("comment", Text),
    Column("labelled_at", DateTime),
    UniqueConstraint("pair_id", "user_id", name="uq_annotate_pair_user"),
    Index("ix_annotate_assignments_user", "user_id", "choice"),
    Index("ix_annotate_assignments_open", "choice", "assigned_at"),
    # Never reuse an id: a reclaimed assignment's id must not come back as someone's new
    # assignment, or an old form still open in a browser would label the wrong pair.
    sqlite_autoincrement=True,
)

links = Table(  # live login links: single use, until expires_at
    "annotate_links",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # sha256 hex; never the token
    Column("user_id", Integer, ForeignKey("annotate_users.id"), nullable=False),
    Column("expires_at", DateTime, nullable=False),
)

sessions = Table(  # logged-in browsers: logout deletes the row, and so ends the session for every copy of its cookie
    "annotate_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 hex of the id the cookie holds; never the id
    Column("user_id", Integer, ForeignKey("annotate_users.id"), nullable=False),
    Column("csrf", String(64), nullable=False),  # the forms' token: useless without the session's cookie
    Column("created_at", DateTime, nullable=False),
    Column("seen_at", DateTime, nullable=False),
    Index("ix_annotate_sessions_user", "user_id"),
)

settings = Table(  # holds no secret any more: the cookie-signing key lives outside the database
    "annotate_settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def now() -> datetime:
    """Naive UTC, which both SQLite and PostgreSQL store and compare the same way."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def hash_token(token: str) -> str:
    """Login tokens are 256 random bits, so one round of sha256 is enough (no brute force)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def normalise_url(url: str) -> str:
    """Accept a bare file path as SQLite, and route plain postgresql:// to psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{url}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url


def _configure_sqlite(engine: Engine) -> None:
    """WAL lets readers run beside the writer; synchronous=FULL makes every acknowledged label
    survive even a power cut; BEGIN IMMEDIATE takes the write lock up front, so two writers
    queue on busy_timeout instead of failing on a lock upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        read_only = connection.get_execution_options().get("annotate_read_only", False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def reading(engine: Engine):
    """A connection for reads only: on SQLite its transaction is deferred, so readers work on a
    WAL snapshot instead of queueing behind writers. Use `engine.begin()` for writes."""
    return engine.connect().execution_options(annotate_read_only=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and for an in-memory one."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_private(path: Path) -> bool:
    """Create an empty file readable and writable by its owner only (0600), whatever the umask; False if it exists.
    SQLite gives a database's -wal and -shm files the permissions of the database file."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def open_store(url: str) -> Engine:
    """Connect, create the schema if it is missing, and return the engine. A new SQLite file is created 0600."""
    url = normalise_url(url)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = sqlite_path(url)
            if path is not None and path.parent.is_dir():
                create_private(path)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _configure_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        metadata.create_all(engine)
    except exc.ArgumentError as error:
        raise AnnotateError(f"--db {url!r} is not a database URL ({error}).") from None
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise AnnotateError(f"cannot open the database {display_url(url)}: {error.orig}") from None
    except ModuleNotFoundError as error:
        raise AnnotateError(
            f"the driver for {display_url(url)} is not installed ({error.name}); "
            "for PostgreSQL install psycopg[binary]."
        ) from None
    return engine


def default_key_file(url: str) -> Path:
    """Where the cookie-signing key lives by default: next to a SQLite file (`annotations.db.key`), else
    `annotate.key` in the current folder."""
    path = sqlite_path(url)
    return path.with_name(path.name + ".key") if path is not None else Path("annotate.key")


def signing_key(url: str, key_file: str | Path | None = None) -> str:
    """The cookie-signing key: $RLHF_ANNOTATE_SECRET_KEY if set, else the key file (made on first use, 0600).

    Outside the database, so a copy of the database (a backup, a file readable by others) cannot sign a cookie;
    in a file, so that sessions survive a restart and every server process on the same database agrees."""
    from_env = os.environ.get(KEY_ENV, "")
    if from_env:
        if len(from_env) < 32:
            raise AnnotateError(f"${KEY_ENV} is too short: use at least 32 random characters "
                                "(python -c 'import secrets; print(secrets.token_hex(32))').")
        return from_env
    path = Path(key_file) if key_file else default_key_file(url)
    try:
        if create_private(path):
            path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise AnnotateError(f"the key file {path} can be read by others (mode {mode:04o}); "
                                f"run: chmod 600 {path}")
        key = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise AnnotateError(f"cannot use the key file {path}: {error.strerror}") from None
    if len(key) < 32:
        raise AnnotateError(f"the key file {path} holds no key (at least 32 characters); delete it to make a new one")
    return key


def forget_stored_key(engine: Engine) -> None:
    """Delete the signing key that older versions kept in the database (a copy of the database gave it away)."""
    with engine.begin() as conn:
        conn.execute(settings.delete().where(settings.c.key == "secret_key"))


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class ImportResult:
    added: int
    already_present: int


def import_pairs(engine: Engine, specs: Iterable[PairSpec], source: str) -> ImportResult:
    """Insert pairs whose key is new; a pair already in the database (same prompt and same two
    responses, in either order) is skipped, so importing a file twice adds nothing."""
    unique: dict[str, PairSpec] = {}
    for spec in specs:
        unique.setdefault(spec.key, spec)
    keys = list(unique)
    added = 0
    with engine.begin() as conn:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            present = set(conn.scalars(select(pairs.c.key).where(pairs.c.key.in_(chunk))))
            rows = [_pair_row(unique[key], source) for key in chunk if key not in present]
            if rows:
                conn.execute(pairs.insert(), rows)
                added += len(rows)
    return ImportResult(added=added, already_present=len(keys) - added)


def _pair_row(spec: PairSpec, source: str) -> dict:
    return {
        "key": spec.key,
        "prompt_json": json.dumps(spec.prompt, ensure_ascii=False),
        "response_a": spec.response_a,
        "response_b": spec.response_b,
        "source": source,
        "n_assigned": 0,
        "created_at": now(),
    }


# ---------------------------------------------------------------- users


def add_user(engine: Engine, name: str, admin: bool = False, reset: bool = False,
             link_lifetime: timedelta = LINK_LIFETIME) -> str:
    """Create a user (or give an existing one a new link with reset=True, which also ends the user's sessions and
    voids their older links) and return the login link's token. Only its hash is stored, so the printed link is
    the only copy; it logs in once, within `link_lifetime`."""
    token = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        existing = conn.execute(select(users.c.id).where(users.c.name == name)).first()
        if existing and not reset:
            raise AnnotateError(
                f"user {name!r} already exists; use --reset to issue a new login link "
                "(the old link and its sessions stop working)."
            )
        if existing:
            values = {"token_hash": hash_token(token)}
            if admin:
                values["is_admin"] = True
            conn.execute(users.update().where(users.c.id == existing.id).values(**values))
            conn.execute(links.delete().where(links.c.user_id == existing.id))
            conn.execute(sessions.delete().where(sessions.c.user_id == existing.id))
            user_id = existing.id
        else:
            user_id = conn.execute(
                users.insert().values(
                    name=name, token_hash=hash_token(token), is_admin=admin, created_at=now()
                )
            ).inserted_primary_key[0]
        conn.execute(links.insert().values(token_hash=hash_token(token), user_id=user_id,
                                           expires_at=now() + link_lifetime))
    return token


def user_by_token(engine: Engine, token: str):
    """The user whose live (unused, unexpired) login link this is, or None. Does not use the link."""
    query = (select(users).join(links, links.c.user_id == users.c.id)
             .where(links.c.token_hash == hash_token(token), links.c.expires_at > now()))
    with reading(engine) as conn:
        return conn.execute(query).first()


def use_link(engine: Engine, token: str):
    """Log in with a link: it is deleted (single use) and its user returned; None if it is unknown, used or
    expired. Two requests with the same link: the delete lets exactly one of them through."""
    with engine.begin() as conn:
        row = conn.execute(select(links.c.user_id, links.c.expires_at)
                           .where(links.c.token_hash == hash_token(token))).first()
        if row is None:
            return None
        gone = conn.execute(links.delete().where(links.c.token_hash == hash_token(token))).rowcount
        if not gone or row.expires_at <= now():
            return None
        return conn.execute(select(users).where(users.c.id == row.user_id)).first()


# ---------------------------------------------------------------- sessions


User = namedtuple("User", [column.name for column in users.columns])


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str  # the forms' CSRF token


def start_session(engine: Engine, user_id: int) -> str:
    """A new session for the user → its id, for the cookie (only its hash is stored)."""
    session_id = secrets.token_urlsafe(32)
    moment = now()
    with engine.begin() as conn:
        conn.execute(sessions.insert().values(id_hash=hash_token(session_id), user_id=user_id,
                                              csrf=secrets.token_urlsafe(32), created_at=moment, seen_at=moment))
    return session_id


def find_session(engine: Engine, session_id: str, idle: timedelta) -> Session | None:
    """The live session with this id, or None: none such, idle longer than `idle`, or older than SESSION_LIFETIME.
    Its last-seen time moves on, written at most once a minute."""
    with reading(engine) as conn:
        row = conn.execute(
            select(sessions.c.seen_at, sessions.c.created_at.label("started_at"), sessions.c.csrf, *users.columns)
            .join(users, users.c.id == sessions.c.user_id)
            .where(sessions.c.id_hash == hash_token(session_id))
        ).first()
    moment = now()
    if row is None or moment - row.seen_at > idle or moment - row.started_at > SESSION_LIFETIME:
        return None
    if moment - row.seen_at > SEEN_EVERY:
        with engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.id_hash == hash_token(session_id))
                         .values(seen_at=moment))
    return Session(User(*(row._mapping[column] for column in users.columns)), row.csrf)


def end_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(sessions.delete().where(sessions.c.id_hash == hash_token(session_id)))


def purge_expired(engine: Engine, idle: timedelta) -> None:
    """Delete sessions past their idle time or lifetime, and login links past their expiry."""
    moment = now()
    with engine.begin() as conn:
        conn.execute(sessions.delete().where((sessions.c.seen_at < moment - idle)
                                             | (sessions.c.created_at < moment - SESSION_LIFETIME)))
        conn.execute(links.delete().where(links.c.expires_at <= moment))


def user_by_id(engine: Engine, user_id: int):
    with reading(engine) as conn:
        return conn.execute(select(users).where(users.c.id == user_id)).first()


def user_by_name(engine: Engine, name: str):
    with reading(engine) as conn:
        return conn.execute(select(users).where(users.c.name == name)).first()


def all_users(engine: Engine) -> list:
    with reading(engine) as conn:
        return list(conn.execute(select(users).order_by(users.c.name)))


# ---------------------------------------------------------------- assignment


def open_assignment(conn, user_id: int):
    """The user's oldest unlabelled assignment, so a reload shows the same pair in the same order."""
    query = (
        select(assignments, pairs.c.prompt_json, pairs.c.response_a, pairs.c.response_b)
        .join(pairs, pairs.c.id == assignments.c.pair_id)
        .where(assignments.c.user_id == user_id, assignments.c.choice.is_(None))
        .order_by(assignments.c.id)
        .limit(1)
    )
    return conn.execute(query).first()


def reclaim_stale(engine: Engine, lease: timedelta) -> int:
    """Free assignments left open longer than the lease (an annotator who walked away), so the
    pair can go to someone else and still reach k labels. Labelled rows are never touched."""
    cutoff = now() - lease
    freed = 0
    with engine.begin() as conn:
        stale = conn.execute(
            select(assignments.c.id, assignments.c.pair_id).where(
                assignments.c.choice.is_(None), assignments.c.assigned_at < cutoff
            )
        ).all()
        for row in stale:
            gone = conn.execute(
                assignments.delete().where(
                    assignments.c.id == row.id, assignments.c.choice.is_(None)
                )
            ).rowcount
            if gone:
                conn.execute(
                    pairs.update()
                    .where(pairs.c.id == row.pair_id)
                    .values(n_assigned=pairs.c.n_assigned - 1)
                )
                freed += 1
    return freed


def _candidate_pairs(conn, user_id: int, k: int) -> list[int]:
    """Pairs this user has never been given that still need annotators. Pairs closest to k come
    first so finished comparisons accumulate; a random pick among the top few keeps concurrent
    annotators from all racing for the same row."""
    seen = select(assignments.c.id).where(
        assignments.c.pair_id == pairs.c.id, assignments.c.user_id == user_id
    )
    query = (
        select(pairs.c.id)
        .where(pairs.c.n_assigned < k, ~seen.exists())
        .order_by(pairs.c.n_assigned.desc(), pairs.c.id)
        .limit(8)
    )
    ids = list(conn.scalars(query))
    random.shuffle(ids)
    return ids


def _try_assign(conn, user_id: int, pair_id: int, k: int) -> bool:
    """Take one of the pair's k places, atomically; False if it filled up meanwhile."""
    taken = conn.execute(
        pairs.update()
        .where(pairs.c.id == pair_id, pairs.c.n_assigned < k)
        .values(n_assigned=pairs.c.n_assigned + 1)
    ).rowcount
    if not taken:
        return False
    conn.execute(
        assignments.insert().values(
            pair_id=pair_id,
            user_id=user_id,
            a_on_left=secrets.randbelow(2) == 1,  # unpredictable order, against position bias
            assigned_at=now(),
        )
    )
    return True


def current_or_next(engine: Engine, user_id: int, k: int):
    """The user's open assignment, or a newly assigned pair, or None when nothing is left."""
    for _attempt in range(20):
        try:
            with engine.begin() as conn:
                row = open_assignment(conn, user_id)
                if row is not None:
                    return row
                candidates = _candidate_pairs(conn, user_id, k)
                if not candidates:
                    return None
                for pair_id in candidates:
                    if _try_assign(conn, user_id, pair_id, k):
                        return open_assignment(conn, user_id)
        except exc.IntegrityError:
            # The same user asked twice at once and both requests picked the same pair; the
            # unique constraint refused one. Start over: the winner's assignment is now open.
            continue
    raise AnnotateError("could not assign a pair after 20 attempts (heavy contention); retry.")


# ---------------------------------------------------------------- labels


def choice_from_position(position: str, a_on_left: bool) -> str:
    """Turn what the annotator clicked (left/right/tie/both_bad) into a/b/tie/both_bad."""
    if position == "left":
        return "a" if a_on_left else "b"
    if position == "right":
        return "b" if a_on_left else "a"
    if position in ("tie", "both_bad"):
        return position
    raise ValueError(f"unknown choice {position!r}; expected one of {', '.join(POSITIONS)}")


def record_label(
    engine: Engine, user_id: int, assignment_id: int, position: str, comment: str | None
) -> str:
    """Store a label; returns 'recorded', 'duplicate' (this assignment was already labelled,
    e.g. a double submit), 'forbidden' (someone else's assignment) or 'gone' (no such
    assignment, e.g. reclaimed after its lease)."""
    with engine.begin() as conn:
        row = conn.execute(
            select(assignments.c.user_id, assignments.c.a_on_left, assignments.c.choice).where(
                assignments.c.id == assignment_id
            )
        ).first()
        if row is None:
            return "gone"
        if row.user_id != user_id:
            return "forbidden"
        if row.choice is not None:
            return "duplicate"
        updated = conn.execute(
            assignments.update()
            .where(assignments.c.id == assignment_id, assignments.c.choice.is_(None))
            .values(
                choice=choice_from_position(position, row.a_on_left),
                comment=comment or None,
                labelled_at=now(),
            )
        ).rowcount
        if updated:
            return "recorded"
        # On PostgreSQL a concurrent request may have labelled or reclaimed the row between our
        # read and our update; look again to say which.
        still_there = conn.scalar(select(assignments.c.id).where(assignments.c.id == assignment_id))
    return "duplicate" if still_there is not None else "gone"


@dataclass(frozen=True)
class Progress:
    done: int
    total: int


def user_progress(engine: Engine, user_id: int, k: int) -> Progress:
    """Labels given, out of labels given plus what is still open to this user (their open
    assignment plus unassigned places on pairs they have not seen)."""
    with reading(engine) as conn:
        labelled, assigned = conn.execute(
            select(func.count(assignments.c.choice), func.count()).where(
                assignments.c.user_id == user_id
            )
        ).one()
        seen = select(assignments.c.id).where(
            assignments.c.pair_id == pairs.c.id, assignments.c.user_id == user_id
        )
        available = conn.scalar(
            select(func.count()).select_from(pairs).where(pairs.c.n_assigned < k, ~seen.exists())
        )
    return Progress(done=labelled, total=assigned + available)


@dataclass(frozen=True)
class LabelRow:
    pair_id: int
    user: str
    choice: str
    a_on_left: bool
    comment: str | None
    labelled_at: datetime


def labels(engine: Engine, user_id: int | None = None) -> list[LabelRow]:
    """Every stored label (optionally one person's), oldest first."""
    query = (
        select(
            assignments.c.pair_id,
            users.c.name,
            assignments.c.choice,
            assignments.c.a_on_left,
            assignments.c.comment,
            assignments.c.labelled_at,
        )
        .join(users, users.c.id == assignments.c.user_id)
        .where(assignments.c.choice.is_not(None))
        .order_by(assignments.c.labelled_at, assignments.c.id)
    )
    if user_id is not None:
        query = query.where(assignments.c.user_id == user_id)
    with reading(engine) as conn:
        return [LabelRow(*row) for row in conn.execute(query)]


@dataclass(frozen=True)
class PairRow:
    id: int
    prompt: Prompt
    response_a: str
    response_b: str


def all_pairs(engine: Engine, ids: Iterable[int] | None = None) -> list[PairRow]:
    """Every pair in import order, or only those with the given ids."""
    query = select(pairs.c.id, pairs.c.prompt_json, pairs.c.response_a, pairs.c.response_b)
    if ids is not None:
        query = query.where(pairs.c.id.in_(list(ids)))
    with reading(engine) as conn:
        rows = conn.execute(query.order_by(pairs.c.id))
        return [PairRow(r.id, json.loads(r.prompt_json), r.response_a, r.response_b) for r in rows]


def counts(engine: Engine) -> dict[str, int]:
    """Totals for the admin overview."""
    with reading(engine) as conn:
        return {
            "pairs": conn.scalar(select(func.count()).select_from(pairs)),
            "labels": conn.scalar(
                select(func.count()).where(assignments.c.choice.is_not(None))
            ),
            "open": conn.scalar(select(func.count()).where(assignments.c.choice.is_(None))),
        }
