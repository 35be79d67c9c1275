"""Logins, CSRF and who may see what, through the real Flask app (in-process client)."""

import re

import pytest

from rlhf.annotate import store
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


def logged_in(app, name: str, admin: bool = False):
    """A browser-like client that has opened the user's login link."""
    token = store.add_user(engine_of(app), name, admin=admin)
    client = app.test_client()
    response = client.get(f"/login/{token}")
    assert response.status_code == 303 and response.headers["Location"].endswith("/queue")
    return client


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
