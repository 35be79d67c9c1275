"""Logins, CSRF and who may see what, through the real Flask app (in-process client)."""

import os
import re
import stat
from datetime import timedelta

import pytest

from rlhf.annotate import KEY_ENV, store
from rlhf.annotate.candidates import PairSpec, pair_key
from rlhf.annotate.stats import left_won
from rlhf.annotate.web import create_app


@pytest.fixture
def app(db_url):
    app = create_app(db_url, k=2)
    engine = app.extensions["annotate"].engine
    specs = [PairSpec(f"p{i}", f"a{i}", f"b{i}", pair_key(f"p{i}", f"a{i}", f"b{i}")) for i in range(3)]
    store.import_pairs(engine, specs, source="test")
    yield app
    engine.dispose()


def engine_of(app):
    return app.extensions["annotate"].engine


def log_in(client, token: str):
    """Open the login link, then press Continue (the form's POST) → the POST's response."""
    page = client.get(f"/login/{token}")
    assert page.status_code == 200, page.status_code
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    return client.post("/login", data={"token": token, "login_csrf": login_csrf})


def logged_in(app, name: str, admin: bool = False):
    """A browser-like client that has logged in with the user's login link."""
    token = store.add_user(engine_of(app), name, admin=admin)
    client = app.test_client()
    response = log_in(client, token)
    assert response.status_code == 303 and response.headers["Location"].endswith("/queue")
    return client


def cookie_name(app) -> str:
    return app.config["SESSION_COOKIE_NAME"]


def form_fields(client) -> dict:
    html = client.get("/queue").get_data(as_text=True)
    return {
        "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', html).group(1),
        "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', html).group(1),
    }


def stored_labels(app) -> list:
    return store.labels(engine_of(app))


def test_writes_and_pages_need_a_login(app):
    anonymous = app.test_client()
    assert anonymous.get("/queue").status_code == 401
    assert anonymous.post("/label", data={"assignment_id": "1", "choice": "left"}).status_code == 401
    assert anonymous.get("/login/not-a-real-token").status_code == 403
    assert anonymous.get("/queue").status_code == 401  # a bad link does not log you in
    assert stored_labels(app) == []


def test_missing_or_forged_csrf_token_is_refused(app):
    client = logged_in(app, "ann")
    fields = form_fields(client)
    other = form_fields(logged_in(app, "bob"))  # a real token, but from another session
    for csrf in (None, "forged", other["csrf_token"]):
        data = {"assignment_id": fields["assignment_id"], "choice": "left"}
        if csrf is not None:
            data["csrf_token"] = csrf
        response = client.post("/label", data=data)
        assert response.status_code == 403, csrf
    assert stored_labels(app) == []
    response = client.post("/label", data={**fields, "choice": "left"})
    assert response.status_code == 303 and response.headers["X-Label-Status"] == "recorded"
    assert [row.user for row in stored_labels(app)] == ["ann"]
    again = client.post("/label", data={**fields, "choice": "right"})  # a double submit
    assert again.headers["X-Label-Status"] == "duplicate"
    (row,) = stored_labels(app)
    assert left_won(row) is True  # the first answer (left) is kept, not overwritten by "right"


def test_annotator_sees_only_their_own_pages(app):
    ann = logged_in(app, "ann")
    logged_in(app, "bob")
    assert ann.get("/admin").status_code == 403
    assert ann.get("/users/bob").status_code == 403
    assert ann.get("/users/ann").status_code == 200
    admin = logged_in(app, "boss", admin=True)
    assert admin.get("/admin").status_code == 200
    assert admin.get("/users/bob").status_code == 200


def test_cannot_label_a_pair_in_someone_elses_queue(app):
    ann, bob = logged_in(app, "ann"), logged_in(app, "bob")
    ann_fields, bob_fields = form_fields(ann), form_fields(bob)
    stolen = {"csrf_token": bob_fields["csrf_token"], "assignment_id": ann_fields["assignment_id"], "choice": "left"}
    assert bob.post("/label", data=stolen).status_code == 403
    assert stored_labels(app) == []


def test_bad_answers_are_rejected(app):
    client = logged_in(app, "ann")
    fields = form_fields(client)
    assert client.post("/label", data={**fields, "choice": "middle"}).status_code == 400
    assert client.post("/label", data={**fields, "assignment_id": "x", "choice": "tie"}).status_code == 400
    assert stored_labels(app) == []


def test_new_link_ends_sessions_from_the_old_one(app):
    client = logged_in(app, "ann")
    assert client.get("/queue").status_code == 200
    store.add_user(engine_of(app), "ann", reset=True)
    assert client.get("/queue").status_code == 401


def test_logout_needs_the_token_and_ends_the_session(app):
    client = logged_in(app, "ann")
    csrf = form_fields(client)["csrf_token"]
    assert client.post("/logout").status_code == 403
    assert client.get("/queue").status_code == 200
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 200
    assert client.get("/queue").status_code == 401


def test_response_html_is_escaped_and_inline_script_forbidden(app):
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    store.import_pairs(engine_of(app),
                       [PairSpec("<b>p</b>", evil, evil + " ", pair_key("<b>p</b>", evil, evil + " "))], "t")
    client = logged_in(app, "ann")
    seen = ""
    for _ in range(4):  # label until the evil pair comes up
        response = client.get("/queue")
        seen += response.get_data(as_text=True)
        client.post("/label", data={**form_fields(client), "choice": "tie"})
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in seen and "<script>alert" not in seen
    assert "<img src=x" not in seen and "&lt;b&gt;p&lt;/b&gt;" in seen
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers["Referrer-Policy"] == "no-referrer"
    login = client.get(f"/login/{store.add_user(engine_of(app), 'zed')}")
    assert "HttpOnly" in login.headers["Set-Cookie"] and "SameSite=Lax" in login.headers["Set-Cookie"]


def answer_all(client, answers: dict[str, str]) -> None:
    """Label the client's whole queue; `answers` maps a pair's prompt to the side clicked."""
    answered = []
    while 'name="assignment_id"' in (html := client.get("/queue").get_data(as_text=True)):
        prompt = re.search(r'<div class="prose">(p\d)</div>', html).group(1)
        response = client.post("/label", data={**form_fields(client), "choice": answers[prompt]})
        assert response.headers["X-Label-Status"] == "recorded"
        answered.append(prompt)
    assert sorted(answered) == sorted(answers)


def test_admin_page_shows_agreement_and_position_bias(app):
    ann, bob = logged_in(app, "ann"), logged_in(app, "bob")
    answer_all(ann, {"p0": "tie", "p1": "both_bad", "p2": "left"})
    answer_all(bob, {"p0": "tie", "p1": "both_bad", "p2": "tie"})
    page = logged_in(app, "boss", admin=True).get("/admin").get_data(as_text=True)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    # Fleiss: P-bar = (1 + 1 + 0) / 3; shares tie 3/6, both bad 2/6, a-or-b 1/6 -> kappa 0.455.
    assert '<strong id="kappa">0.455</strong>' in page
    assert "6 of 6 labels (3 pairs × k=2)" in text
    assert "3 pairs have k=2 labels" in text
    assert "left response won 100% of 1 decisive labels" in text
    assert "ann 3 1 1 1 67% of 3 100% of 1" in text
    assert "bob 3 0 2 1 67% of 3 – of 0" in text


# ---------------------------------------------------------------- credentials


def database_strings(engine) -> list[str]:
    """Every value in every table, as text: what a read-only copy of the database gives its reader."""
    from sqlalchemy import MetaData, select

    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as conn:
        return [str(v) for table in tables.sorted_tables for row in conn.execute(select(table)) for v in row
                if v is not None]


def signed_cookie(key: str, payload: dict) -> str:
    """A session cookie as Flask signs it, with `key` as the signing key."""
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    forger = Flask("forger")
    forger.secret_key = key
    return SecureCookieSessionInterface().get_signing_serializer(forger).dumps(payload)


def test_a_copy_of_the_database_cannot_forge_a_session(app):
    import hashlib

    boss = logged_in(app, "boss", admin=True)
    assert boss.get("/admin").status_code == 200
    found = [v for v in database_strings(engine_of(app)) if len(v) >= 32]  # keys, hashes and tokens are long
    admin = store.user_by_name(engine_of(app), "boss")
    payloads = [{"sid": value} for value in found]
    # what a cookie held before: the user id and a check derived from the stored token hash
    payloads.append({"uid": admin.id, "csrf": "x",
                     "login": hashlib.sha256(f"session:{admin.token_hash}".encode()).hexdigest()[:32]})
    for key in found:
        for payload in payloads:
            forger = app.test_client()
            forger.set_cookie(cookie_name(app), signed_cookie(key, payload))
            assert forger.get("/admin").status_code == 401, (key, payload)


def test_logout_ends_the_session_for_every_copy_of_its_cookie(app):
    client = logged_in(app, "ann")
    copied = client.get_cookie(cookie_name(app)).value
    assert client.post("/logout", data={"csrf_token": form_fields(client)["csrf_token"]}).status_code == 200
    thief = app.test_client()
    thief.set_cookie(cookie_name(app), copied)
    assert thief.get("/queue").status_code == 401


def test_an_idle_session_ends(app):
    client = logged_in(app, "ann")
    assert client.get("/queue").status_code == 200
    with engine_of(app).begin() as conn:  # 25 hours without a request; the idle time is 24 hours
        conn.execute(store.sessions.update().values(seen_at=store.now() - timedelta(hours=25)))
    assert client.get("/queue").status_code == 401


def test_login_links_need_the_continue_page_work_once_and_expire(app):
    engine = engine_of(app)
    token = store.add_user(engine, "ann")
    browser = app.test_client()
    assert browser.get(f"/login/{token}").status_code == 200
    assert browser.get("/queue").status_code == 401  # opening the link (a preview, a prefetch) logs nobody in
    # login CSRF: another site's page posts the link to /login; no cookie of that browser carries the form's token
    assert app.test_client().post("/login", data={"token": token, "login_csrf": "guess"}).status_code == 403
    assert browser.post("/login", data={"token": token}).status_code == 403
    assert log_in(browser, token).status_code == 303 and browser.get("/queue").status_code == 200
    assert app.test_client().get(f"/login/{token}").status_code == 403  # used up
    assert store.use_link(engine, token) is None
    late = store.add_user(engine, "bob")
    with engine.begin() as conn:
        conn.execute(store.links.update().values(expires_at=store.now() - timedelta(seconds=1)))
    assert app.test_client().get(f"/login/{late}").status_code == 403
    assert store.use_link(engine, late) is None


def test_cookies_are_secure_when_asked(db_url):
    from rlhf.annotate.cli import build_parser, secure_cookies

    app = create_app(db_url, secure_cookies=True)
    client = app.test_client()
    page = client.get(f"/login/{store.add_user(engine_of(app), 'ann')}", base_url="https://localhost")
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("__Host-rlhf_annotate=") and "Secure" in cookie and "HttpOnly" in cookie
    engine_of(app).dispose()
    parse = build_parser().parse_args
    assert secure_cookies(parse(["serve", "--host", "0.0.0.0"]))  # on by default beyond loopback
    assert not secure_cookies(parse(["serve"]))  # 127.0.0.1
    assert not secure_cookies(parse(["serve", "--host", "0.0.0.0", "--no-secure-cookies"]))
    assert secure_cookies(parse(["serve", "--secure-cookies"]))


def test_an_assignment_id_beyond_64_bits_is_a_400(app):
    client = logged_in(app, "ann")
    fields = form_fields(client)
    for bad in (str(2**64), str(2**63), "-1", "0"):
        assert client.post("/label", data={**fields, "assignment_id": bad, "choice": "left"}).status_code == 400
    assert stored_labels(app) == []


def test_database_and_key_files_are_private(tmp_path, monkeypatch):
    from rlhf.annotate.errors import AnnotateError

    monkeypatch.delenv(KEY_ENV, raising=False)
    database = tmp_path / "annotations.db"
    old_umask = os.umask(0o022)  # the usual umask: files are created 0644 unless the code asks otherwise
    try:
        app = create_app(f"sqlite:///{database}")
        store.add_user(engine_of(app), "ann")  # a write: the -wal file exists now
        for path in (database, tmp_path / "annotations.db-wal", tmp_path / "annotations.db.key"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert "secret_key" not in database_strings(engine_of(app))
        engine_of(app).dispose()
        os.chmod(tmp_path / "annotations.db.key", 0o644)
        with pytest.raises(AnnotateError, match="chmod 600"):
            create_app(f"sqlite:///{database}")
    finally:
        os.umask(old_umask)


def test_a_key_left_in_the_database_by_an_older_version_is_deleted(db_url):
    engine = store.open_store(db_url)
    with engine.begin() as conn:
        conn.execute(store.settings.insert().values(key="secret_key", value="k" * 64))
    app = create_app(db_url)
    assert app.config["SECRET_KEY"] != "k" * 64 and "k" * 64 not in database_strings(engine)
    engine.dispose()
    engine_of(app).dispose()


def test_the_served_app_refuses_big_bodies_and_foreign_host_names(tmp_path):
    import http.client

    from a2wsgi import WSGIMiddleware

    from rlhf import httpd
    from rlhf.annotate.web import MAX_BODY_BYTES

    app = create_app(f"sqlite:///{tmp_path / 'annotations.db'}")
    with httpd.serving(httpd.protect(WSGIMiddleware(app), "127.0.0.1", MAX_BODY_BYTES)) as listener:
        def ask(method: str, body: bytes | None = None, host: str = "127.0.0.1") -> int:
            conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
            conn.request(method, "/static/annotate.css" if method == "GET" else "/label", body=body,
                         headers={"Host": host})
            status = conn.getresponse().status
            conn.close()
            return status

        assert ask("GET") == 200
        assert ask("GET", host="evil.example") == 400  # DNS rebinding: a page of evil.example pointed at us
        assert ask("POST", b"x" * (MAX_BODY_BYTES + 1)) == 413
        assert ask("POST", b"x" * 10) == 401  # a small body reaches the app, which wants a login
    engine_of(app).dispose()
