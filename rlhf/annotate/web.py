"""The annotation web app (Flask, server-rendered pages).

Security model, in short:
* a personal login link carries a random token; only its sha256 is stored. Opening the link
  changes nothing: it shows a "Continue" page whose POST (with a token that only this browser's
  cookie matches, against login CSRF) uses the link up (single use; links expire after 7 days)
  and starts a session;
* a session is a row on the server: the cookie (signed, HttpOnly, SameSite=Lax, Secure when
  served beyond loopback) holds a random id whose sha256 the row stores. Logout deletes the row,
  so a copied cookie stops working too; a session ends after its idle time or 14 days;
* the cookie-signing key is not in the database (store.signing_key), so a copy of the database
  can neither sign a cookie nor name a live session;
* every POST needs a logged-in user and the session's CSRF token (compared in constant time);
* annotators see only their own queue and labels; /admin and other people's pages are 403;
* response text is only ever inserted through Jinja's autoescaping, and the Content Security
  Policy forbids inline scripts as a second line of defence.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import Engine

from rlhf.annotate import stats, store
from rlhf.annotate.render import segments
from rlhf.annotate.store import CHOICES, POSITIONS

DEFAULT_QUESTION = "Which response is better?"
MAX_COMMENT_CHARS = 5000
MAX_BODY_BYTES = 64 * 1024  # a label form is tiny; the HTTP layer refuses bigger bodies before Flask sees them
MAX_ID = (1 << 63) - 1  # ids are 64-bit signed integers in both databases
RECLAIM_EVERY_S = 60.0

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

bp = Blueprint("annotate", __name__)


@dataclass
class AppState:
    engine: Engine
    k: int
    lease: timedelta
    question: str
    idle: timedelta  # a session unused this long ends
    last_reclaim: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(
    db_url: str,
    k: int = 3,
    lease_minutes: float = 60.0,
    question: str = DEFAULT_QUESTION,
    secure_cookies: bool = False,
    session_idle_hours: float = 24.0,
    key_file: str | None = None,
) -> Flask:
    """Build the app; opening the store creates the schema on first start. `secure_cookies`: the browser sends
    the cookie over HTTPS only (serve behind an HTTPS proxy); `key_file`: the cookie-signing key's file (default:
    next to a SQLite database; store.signing_key)."""
    engine = store.open_store(db_url)
    secret = store.signing_key(db_url, key_file)
    store.forget_stored_key(engine)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies,
        # __Host-: browsers keep such a cookie only if Secure, for this host and path "/" (no subdomain can set it)
        SESSION_COOKIE_NAME="__Host-rlhf_annotate" if secure_cookies else "rlhf_annotate",
        PERMANENT_SESSION_LIFETIME=store.SESSION_LIFETIME,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,  # a label form is tiny; refuse anything big
    )
    app.extensions["annotate"] = AppState(engine, k, timedelta(minutes=lease_minutes), question,
                                          timedelta(hours=session_idle_hours))
    app.register_blueprint(bp)
    app.jinja_env.filters.update(pct=percent, prompt_text=prompt_text, shown_answer=shown_answer)
    for code in (400, 401, 403, 404, 405, 413):
        app.register_error_handler(code, error_page)
    return app


def state() -> AppState:
    return current_app.extensions["annotate"]


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def prompt_text(prompt: store.Prompt) -> str:
    """A one-line version of a prompt for tables: the last turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return prompt[-1]["content"] if prompt else ""


def shown_answer(row: store.LabelRow) -> str:
    """The answer as the annotator saw it (A = left), not as stored (a = first response)."""
    won = stats.left_won(row)
    if won is None:
        return "Tie" if row.choice == "tie" else "Both bad"
    return "A (left) better" if won else "B (right) better"


def prompt_turns(prompt: store.Prompt) -> list[tuple[str | None, list]]:
    """(role, segments) per turn; a plain-string prompt is one turn without a role."""
    if isinstance(prompt, str):
        return [(None, segments(prompt))]
    return [(turn["role"], segments(turn["content"])) for turn in prompt]


# ---------------------------------------------------------------- request hooks


@bp.before_app_request
def load_user() -> None:
    g.user, g.csrf = None, ""
    session_id = session.get("sid")
    if not isinstance(session_id, str) or request.endpoint == "static":  # CSS and JS need no database lookup
        return
    found = store.find_session(state().engine, session_id, state().idle)
    if found is None:  # logged out, idle too long, or ended by `add-user --reset`
        session.clear()
        return
    g.user, g.csrf = found.user, found.csrf


@bp.before_app_request
def protect_writes() -> None:
    """Every state-changing request needs a login and the session's CSRF token (logging in has its own check)."""
    if request.method not in ("POST", "PUT", "PATCH", "DELETE") or request.endpoint == "annotate.log_in":
        return
    if g.user is None:
        abort(401, "Log in with your personal link first.")
    sent = request.form.get("csrf_token", "")
    expected = g.csrf
    if not sent or not expected or not hmac.compare_digest(sent, expected):
        abort(403, "The form's security token is missing or wrong. Reload the page and try again.")


@bp.after_app_request
def security_headers(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def error_page(error):
    return render_template("error.html", error=error), error.code


def require_login():
    if g.user is None:
        abort(401, "Open your personal login link to start (ask your admin for one).")
    return g.user


def require_admin():
    user = require_login()
    if not user.is_admin:
        abort(403, "Only an admin can open this page.")
    return user


# ---------------------------------------------------------------- pages


LINK_INVALID = ("This login link is not valid: it was used already, it expired, or a newer one replaced it. "
                "Ask your admin for a new one.")


@bp.get("/login/<token>")
def login(token: str):
    """Opening a link logs nobody in (a link preview, a prefetch, or a page of someone else's that loads it
    changes nothing): it shows a Continue button, whose POST carries a token tied to this browser's cookie."""
    user = store.user_by_token(state().engine, token)
    if user is None:
        abort(403, LINK_INVALID)
    session["login_csrf"] = secrets.token_urlsafe(32)
    return render_template("login.html", name=user.name, token=token, login_csrf=session["login_csrf"])


@bp.post("/login")
def log_in():
    expected = session.pop("login_csrf", "")
    sent = request.form.get("login_csrf", "")
    if not sent or not expected or not hmac.compare_digest(sent, expected):
        abort(403, "This login form did not come from this browser's login page. Open your login link again.")
    user = store.use_link(state().engine, request.form.get("token", ""))
    if user is None:
        abort(403, LINK_INVALID)
    if isinstance(session.get("sid"), str):  # a session this browser had (maybe another person's) ends here
        store.end_session(state().engine, session["sid"])
    session.clear()
    session.permanent = True
    session["sid"] = store.start_session(state().engine, user.id)
    return redirect(url_for("annotate.queue"), code=303)  # 303: a reload does not post the form again


@bp.post("/logout")
def logout():
    store.end_session(state().engine, session["sid"])  # protect_writes made sure there is one
    session.clear()
    g.user = None
    return render_template("error.html", error=None, message="You are logged out.")


@bp.get("/")
def index():
    require_login()
    return redirect(url_for("annotate.queue"))


@bp.get("/queue")
def queue():
    user = require_login()
    app_state = state()
    maybe_reclaim(app_state)
    row = store.current_or_next(app_state.engine, user.id, app_state.k)
    progress = store.user_progress(app_state.engine, user.id, app_state.k)
    if row is None:
        return render_template("done.html", progress=progress)
    left, right = (
        (row.response_a, row.response_b) if row.a_on_left else (row.response_b, row.response_a)
    )
    return render_template(
        "queue.html",
        assignment_id=row.id,
        prompt=prompt_turns(json.loads(row.prompt_json)),
        left=segments(left),
        right=segments(right),
        progress=progress,
        question=app_state.question,
    )


def maybe_reclaim(app_state: AppState) -> None:
    """Run the stale-assignment sweep at most once a minute, not on every page view."""
    with app_state.lock:
        if time.monotonic() - app_state.last_reclaim < RECLAIM_EVERY_S:
            return
        app_state.last_reclaim = time.monotonic()
    store.reclaim_stale(app_state.engine, app_state.lease)
    store.purge_expired(app_state.engine, app_state.idle)


@bp.post("/label")
def label():
    user = require_login()
    position = request.form.get("choice", "")
    if position not in POSITIONS:
        abort(400, f"Unknown answer {position!r}; expected one of {', '.join(POSITIONS)}.")
    try:
        assignment_id = int(request.form.get("assignment_id", ""))
    except ValueError:
        assignment_id = 0
    if not 0 < assignment_id <= MAX_ID:
        abort(400, "The form has no valid assignment id.")
    comment = request.form.get("comment", "").strip()[:MAX_COMMENT_CHARS]
    outcome = store.record_label(state().engine, user.id, assignment_id, position, comment)
    if outcome == "forbidden":
        abort(403, "That pair is in someone else's queue.")
    if outcome == "gone":
        flash("That pair sat open too long and went to someone else; here is your next one.")
    elif outcome == "duplicate":
        flash("That pair was already labelled; your first answer is kept.")
    response = redirect(url_for("annotate.queue"), code=303)
    # Scripted clients (the load test) tell a stored label from a kept earlier one by this.
    response.headers["X-Label-Status"] = outcome
    return response


@bp.get("/users/<name>")
def user_page(name: str):
    viewer = require_login()
    if viewer.name != name and not viewer.is_admin:
        abort(403, "You can only see your own labels.")
    person = store.user_by_name(state().engine, name)
    if person is None:
        abort(404, f"No user named {name!r}.")
    rows = store.labels(state().engine, person.id)
    pairs = {pair.id: pair for pair in store.all_pairs(state().engine, {r.pair_id for r in rows})}
    return render_template("user.html", person=person, rows=rows, pairs=pairs)


@bp.get("/admin")
def admin():
    require_admin()
    app_state = state()
    rows = store.labels(app_state.engine)
    votes = stats.votes_by_pair(rows)
    totals = store.counts(app_state.engine)
    return render_template(
        "admin.html",
        totals=totals,
        k=app_state.k,
        target=totals["pairs"] * app_state.k,
        complete=sum(1 for v in votes.values() if sum(v.values()) >= app_state.k),
        multi=sum(1 for v in votes.values() if sum(v.values()) >= 2),
        kappa=stats.pair_kappa(rows),
        bias=stats.position_bias(rows),
        people=people_table(app_state.engine, rows),
    )


def people_table(engine: Engine, rows: list[store.LabelRow]) -> list[dict]:
    """One line per person: volume, answer mix, agreement with the others, left-wins rate."""
    agreement = stats.agreement_with_majority(rows)
    table = []
    for person in store.all_users(engine):
        mine = [row for row in rows if row.user == person.name]
        table.append(
            {
                "name": person.name,
                "is_admin": person.is_admin,
                "labels": len(mine),
                "mix": {choice: sum(r.choice == choice for r in mine) for choice in CHOICES},
                "agreement": agreement.get(person.name, stats.Rate(0, 0)),
                "bias": stats.position_bias(mine),
            }
        )
    return table
