"""The HTTP layer against a real database: auth, problem+json, idempotency headers, webhooks, OpenAPI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import psycopg
import pytest
from litestar.testing import TestClient

from api.app import create_app
from dispatcher import keys, schema
from dispatcher.settings import Settings
from providers import standard_webhooks as sw
from tests.conftest import app_url, call, intent

SECRET = sw.new_secret()


def make_key(db: psycopg.Connection, tenant: str) -> tuple[str, str]:
    key = keys.generate()
    info = call(db, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    return key, info["id"]


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, ready: str) -> Iterator[TestClient]:
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET, max_body_bytes=64 * 1024)
    key, _ = make_key(db, ready)
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def is_problem(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:notification-dispatcher:problem:") and body["title"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_submit_then_replay_then_reuse(client):
    first = client.post("/internal/notifications", json=intent(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    body = first.json()
    assert body["status"] == "accepted" and [d["channel"] for d in body["deliveries"]] == ["whatsapp", "email"]
    again = client.post("/internal/notifications", json=intent(), headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true" and again.json() == body
    reused = client.post(
        "/internal/notifications", json=intent(variables={"name": "Bob", "event": "x"}), headers={"Idempotency-Key": "k-1"}
    )
    assert is_problem(reused, 422, "Idempotency-Key")["type"].endswith("idempotency_key_reused")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nd_00000000_wrong"}, {"Authorization": "Basic abc"}])
def test_internal_routes_need_a_valid_key(client, headers):
    client.headers.pop("Authorization")
    response = client.get("/internal/templates", headers=headers)
    is_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_is_refused_at_once(client, db, ready):
    key, key_id = make_key(db, ready)
    assert client.get("/internal/templates", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    call(db, "notify_api.revoke_api_key_v1(%s, %s)", ready, key_id)
    is_problem(client.get("/internal/templates", headers={"Authorization": f"Bearer {key}"}), 401)


def test_another_tenants_notification_is_404(client, db):
    created = client.post("/internal/notifications", json=intent()).json()
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    other_key, _ = make_key(db, other)
    headers = {"Authorization": f"Bearer {other_key}"}
    is_problem(client.get(f"/internal/notifications/{created['id']}", headers=headers), 404, "id")
    is_problem(client.post(f"/internal/notifications/{created['id']}/cancel", headers=headers), 404)
    assert client.get(f"/internal/notifications/{created['id']}").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (intent(bogus=True), 400, "bogus"),
        (intent(recipient={"ref": "r", "addresses": {"whatsapp": 5}}), 400, "recipient.addresses.whatsapp"),
        (intent(channels=["pigeon"]), 400, "channels[0]"),
        (intent(recipient={"ref": "r", "addresses": {"whatsapp": "0034 600"}}), 400, "recipient.addresses.whatsapp"),
        (intent(template="missing"), 422, "template"),
        (intent(variables={}), 422, "variables.event"),
        ({"channels": ["email"], "template": "event_reminder"}, 400, "recipient"),
        ({"channels": ["email"]}, 400, "template"),
    ],
)
def test_bad_submissions_are_problems_naming_the_field(client, db, body, status, field):
    is_problem(client.post("/internal/notifications", json=body), status, field)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_a_route_and_a_priority_over_http(client, db):
    body = intent(priority="high", route=[{"channel": "whatsapp", "within": "PT15M"}, {"channel": "email"}])
    body.pop("channels")
    created = client.post("/internal/notifications", json=body)
    assert created.status_code == 202, created.text
    assert [(d["step"], d["status"]) for d in created.json()["deliveries"]] == [(1, "queued"), (2, "waiting")]
    read = client.get(f"/internal/notifications/{created.json()['id']}").json()
    assert read["route"][0] == {"channel": "whatsapp", "until": "delivered", "within": "PT15M"} and read["priority"] == "high"
    assert [d["step"] for d in read["deliveries"]] == [1, 2]
    bad = {**body, "route": [{"channel": "whatsapp", "within": "soon"}, {"channel": "email"}]}
    is_problem(client.post("/internal/notifications", json=bad), 400, "route[0].within")
    is_problem(client.post("/internal/notifications", json={**body, "priority": "urgent"}), 400, "priority")
    is_problem(client.post("/internal/notifications", json={**body, "channels": ["email"]}), 400, "route")


def test_malformed_json_and_nul_characters_are_400(client):
    is_problem(client.post("/internal/notifications", content=b"{not json", headers={"content-type": "application/json"}), 400)
    body = intent(variables={"name": "A\u0000na", "event": "x"})
    is_problem(client.post("/internal/notifications", json=body), 400)


def test_oversized_bodies_are_413(client):
    is_problem(client.put("/internal/recipients/r1", json={"locale": "x" * 70_000}), 413)
    body = intent(metadata={"blob": "x" * (17 * 1024 * 1024)})  # over the bulk limit of the submit routes
    is_problem(client.post("/internal/notifications", json=body), 413)


def test_fanout_and_batch_over_http(client, db):
    recipients = [
        {"ref": f"m{i}", "addresses": {"email": f"m{i}@example.com"}, "variables": {"name": f"M{i}"}} for i in range(300)
    ]
    body = {"recipients": recipients, "channels": ["email"], "template": "event_reminder", "variables": {"event": "Long run"}}
    first = client.post("/internal/notifications", json=body, headers={"Idempotency-Key": "fan-1"})
    assert first.status_code == 202 and first.json()["recipient_count"] == 300
    assert first.json()["summary"] == [{"channel": "email", "status": "queued", "count": 300}]
    again = client.post("/internal/notifications", json=body, headers={"Idempotency-Key": "fan-1"})
    assert again.status_code == 200 and again.json() == first.json()
    bad = dict(body, recipients=[*recipients[:5], {"ref": "x", "addresses": {"email": "nope"}}])
    is_problem(client.post("/internal/notifications", json=bad), 400, "recipients[5].addresses.email")
    read = client.get(f"/internal/notifications/{first.json()['id']}").json()
    # over 100 deliveries: a summary, and the deliveries page by page (sql/065_api_lookup.sql)
    assert read["recipient_count"] == 300 and read["deliveries_omitted"] and "deliveries" not in read
    assert read["summary"] == [{"channel": "email", "status": "queued", "count": 300}] and read["delivery_count"] == 300
    pages = [client.get(f"/internal/notifications/{first.json()['id']}/deliveries", params={"limit": 200}).json()]
    pages.append(
        client.get(
            f"/internal/notifications/{first.json()['id']}/deliveries", params={"cursor": pages[0]["next_cursor"], "limit": 200}
        ).json()
    )
    assert [len(p["items"]) for p in pages] == [200, 100] and pages[1]["next_cursor"] is None

    items = [
        {
            "idempotency_key": f"b{i}",
            "notification": intent(channels=["email"], recipient={"ref": f"b{i}", "addresses": {"email": f"b{i}@example.com"}}),
        }
        for i in range(3)
    ]
    items[1]["notification"]["template"] = "missing"
    out = client.post("/internal/notifications/batch", json={"items": items})
    assert out.status_code == 200
    assert [(i["outcome"], i["status"]) for i in out.json()["items"]] == [("accepted", 202), ("error", 422), ("accepted", 202)]
    assert out.json()["items"][1]["error"]["field"] == "template"
    is_problem(client.post("/internal/notifications/batch", json={"items": []}), 400, "items")


def test_read_and_cancel(client):
    created = client.post("/internal/notifications", json=intent(send_at="2099-01-01T00:00:00Z")).json()
    read = client.get(f"/internal/notifications/{created['id']}").json()
    assert read["status"] == "in_progress" and read["recipient"] == "runner-42"
    assert read["deliveries"][0]["events"][0]["to"] == "scheduled"
    cancelled = client.post(f"/internal/notifications/{created['id']}/cancel")
    assert cancelled.status_code == 200 and all(d["cancelled"] for d in cancelled.json()["deliveries"])
    assert client.get(f"/internal/notifications/{created['id']}").json()["status"] == "completed"
    is_problem(client.get(f"/internal/notifications/{uuid.uuid4()}"), 404)
    is_problem(client.get("/internal/notifications/not-a-uuid"), 404)


def test_recipients_and_consents(client):
    put = client.put("/internal/recipients/runner-7", json={"addresses": {"email": "r7@example.com"}, "locale": "es-ES"})
    assert put.status_code == 200 and put.json()["addresses"] == {"email": "r7@example.com"}
    assert client.get("/internal/recipients/runner-7").json()["locale"] == "es-ES"
    is_problem(client.get("/internal/recipients/nobody"), 404)
    created = client.post(
        "/internal/recipients/runner-7/consents",
        json={"channel": "whatsapp", "status": "granted", "source": "app", "evidence": {"screen": "settings"}},
    )
    assert created.status_code == 201 and created.json()["recorded_by"].startswith("api_key:")
    listed = client.get("/internal/recipients/runner-7/consents").json()
    assert listed["current"][0] == {"channel": "whatsapp", "allowed": True, "policy": "opt_in", "categories": []}
    # a category-level revoke shows for that category; the channel-wide state stays as it is
    assert (
        client.post(
            "/internal/recipients/runner-7/consents",
            json={"channel": "email", "status": "revoked", "source": "preferences", "category": "marketing"},
        ).status_code
        == 201
    )
    email = [c for c in client.get("/internal/recipients/runner-7/consents").json()["current"] if c["channel"] == "email"]
    assert email == [
        {"channel": "email", "allowed": True, "policy": "opt_out", "categories": [{"category": "marketing", "allowed": False}]}
    ]
    is_problem(
        client.post("/internal/recipients/runner-7/consents", json={"channel": "whatsapp", "status": "nope", "source": "x"}),
        400,
        "status",
    )


def test_templates_and_policies(client):
    put = client.put("/internal/templates/welcome", json={"locale": "es", "channels": {"sms": {"text": "Hola {{name}}"}}})
    assert put.status_code == 200 and put.json()[0]["required_variables"] == ["name"]
    keys_listed = {t["key"] for t in client.get("/internal/templates").json()}
    assert keys_listed == {"welcome", "event_reminder"}
    assert [t["key"] for t in client.get("/internal/templates", params={"key": "welcome"}).json()] == ["welcome"]
    is_problem(client.put("/internal/templates/welcome", json={"channels": {"sms": {}}}), 400, "channels.sms.text")
    assert client.put("/internal/channels/email/policy", json={"policy": "opt_in"}).json()["policy"] == "opt_in"
    assert {p["channel"]: p["policy"] for p in client.get("/internal/channels/policies").json()}["email"] == "opt_in"
    is_problem(client.put("/internal/channels/fax/policy", json={"policy": "opt_in"}), 404)


def signed(body: dict, secret: str = SECRET, msg_id: str = "msg_1") -> tuple[bytes, dict]:
    raw = json.dumps(body).encode()
    return raw, {"content-type": "application/json", **sw.headers(secret, msg_id, raw)}


def test_webhooks_verify_store_once_and_apply(client, db):
    created = client.post("/internal/notifications", json=intent(channels=["email"])).json()
    delivery = created["deliveries"][0]["id"]
    db.execute("select * from notify_api.claim_deliveries_v1('email', 10)")
    tenant = db.execute("select tenant_id from notify.notification_deliveries").fetchone()[0]
    body = {
        "type": "message.status.delivered",
        "timestamp": "2026-11-26T10:00:00Z",
        "data": {"message_id": "mock-x", "correlation_id": f"{tenant}:{delivery}", "status": "delivered"},
    }
    raw, headers = signed(body)
    client.headers.pop("Authorization")
    forged = dict(headers, **{"webhook-signature": "v1," + "B" * 44})
    is_problem(client.post("/public/webhooks/mock", content=raw, headers=forged), 401)
    stale = dict(headers, **sw.headers(SECRET, "msg_1", raw, timestamp=1_700_000_000))
    is_problem(client.post("/public/webhooks/mock", content=raw, headers=stale), 401)
    assert db.execute("select count(*) from notify.webhook_events").fetchone()[0] == 0
    ok = client.post("/public/webhooks/mock", content=raw, headers=headers)
    assert ok.status_code == 200 and ok.json() == {"stored": True, "duplicate": False}
    dup = client.post("/public/webhooks/mock", content=raw, headers=headers)
    assert dup.status_code == 200 and dup.json() == {"stored": False, "duplicate": True}
    assert db.execute("select count(*) from notify.webhook_events").fetchone()[0] == 1
    assert db.execute("select status::text from notify.notification_deliveries").fetchone()[0] == "delivered"
    is_problem(client.post("/public/webhooks/unknown-provider", content=raw, headers=headers), 404)
    raw_bad, headers_bad = signed({"hello": 1}, msg_id="msg_2")
    kept = client.post("/public/webhooks/mock", content=raw_bad, headers=headers_bad)  # verified: stored, not refused
    assert kept.status_code == 200 and kept.json() == {"stored": True, "duplicate": False}


def test_health_version_and_openapi(client):
    client.headers.pop("Authorization")
    assert client.get("/health").json() == {"status": "ok", "database": "ok"}
    assert client.get("/version").json()["schema"] == schema.migration_files()[-1].stem
    spec = client.get("/schema/openapi.json").json()
    operations = {
        op["operationId"]
        for path in spec["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {
        "submitNotification",
        "getNotification",
        "cancelNotification",
        "upsertRecipient",
        "getRecipient",
        "recordConsent",
        "listConsents",
        "upsertTemplate",
        "listTemplates",
        "receiveWebhook",
        "health",
        "version",
        "submitNotificationBatch",
        "setChannelProvider",
        "verifyWebhook",
        "unsubscribe",
    } <= operations
    assert "BearerAuth" in spec["components"]["securitySchemes"]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if tag in ("script", "link", "img") and name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_api_reference_page_needs_no_other_host(client, page):
    """/schema on an offline host: every script, style sheet and icon it references is served by the service itself."""
    client.headers.pop("Authorization")
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in response.text and '"openapi"' in response.text  # the document is inlined in the page
    parser = _Assets()
    parser.feed(response.text)
    assert len(parser.urls) >= 4, parser.urls  # style sheet, bundle, preset, icon
    for url in parser.urls:
        assert urlsplit(url).scheme == "" and urlsplit(url).netloc == "" and url.startswith("/schema/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    types = {url.rsplit(".", 1)[-1]: client.get(url).headers["content-type"] for url in parser.urls}
    assert types["js"].startswith(("application/javascript", "text/javascript")) and types["css"].startswith("text/css")
    assert "https://" not in "".join(parser.urls)
    # only the page's own files: the wheel's other files (Swagger Editor, source maps) and escapes are not served
    for url in ["/schema/assets/swagger-editor-bundle.js", "/schema/assets/../__init__.py", "/schema/assets/LICENSE"]:
        assert client.get(url).status_code == 404, url


def test_a_database_outage_is_503_with_retry_after(tmp_path):
    settings = Settings(database_url=f"postgresql://nobody@/nowhere?host={tmp_path}&connect_timeout=1", pool_min=0)
    app = create_app(settings)
    app.state.db.pool.timeout = 1.0
    with TestClient(app=app) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "2"
        response = c.get("/internal/templates", headers={"Authorization": "Bearer nd_00000000_x"})
        body = is_problem(response, 503)
        assert response.headers["retry-after"] == "2" and "Traceback" not in json.dumps(body)


@pytest.mark.parametrize(
    ("body", "type_"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
        (
            b'{"channels":["email"],"template":"t","recipient":{"ref":"r"},"variables":{"a":'
            + b"[" * 10_000
            + b"]" * 10_000
            + b"}}",
            "invalid_json",
        ),
        (b'{"channels":["email"],"template":"\xff\xfe","recipient":{"ref":"r"}}', "invalid_encoding"),
        (b'{"channels":["email"],"template":"' + b"x" * 2_000_000 + b'","recipient":{"ref":"r"}}', "invalid_request"),
        (
            b'{"channels":["email"],"template":"event_reminder","recipient":{"ref":"r","addresses":{"email":"'
            + b"a" * 300
            + b'@example.com"}}}',
            "invalid_request",
        ),
    ],
)
def test_hostile_bodies_are_clear_400s(client, db, body, type_):
    response = client.post("/internal/notifications", content=body, headers={"content-type": "application/json"})
    assert is_problem(response, 400)["type"].endswith(type_)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_scopes_and_rate_limits_over_http(client, db, ready):
    reader = keys.generate()
    call(
        db,
        "notify_api.create_api_key_v1(%s, 'reader', %s, %s, %s)",
        ready,
        keys.display_prefix(reader),
        keys.digest(reader),
        ["read"],
    )
    headers = {"Authorization": f"Bearer {reader}"}
    assert client.get("/internal/templates", headers=headers).status_code == 200
    denied = client.post("/internal/notifications", json=intent(), headers=headers)
    assert is_problem(denied, 403)["type"].endswith("insufficient_scope")
    assert is_problem(client.put("/internal/templates/x", json={"channels": {"sms": {"text": "t"}}}, headers=headers), 403)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0
    call(db, "notify_api.set_api_rate_v1(%s, 2)", ready)
    answers = [client.get("/internal/templates", headers=headers) for _ in range(4)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and limited[0].headers["retry-after"] == "1"
    assert is_problem(limited[0], 429)["type"].endswith("rate_limited")
