"""Attacks on provider settings by a tenant admin (its own API key, over HTTP) against the real API and worker and the
Graph API fake: naming the worker's secrets, pointing the provider at an internal host, taking another tenant's business
number, widening its own secret namespace. The operator's grant (notify.provider_grants) is the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from dispatcher import keys
from tests.conftest import REMINDER, Service, app_url, call, intent, start_service, stop_service, url_of
from tests.fakes.graph_api import GraphFake

pytestmark = pytest.mark.slow

PREFIX = "NOTIFY_TENANT_ACME_"
WORKER_SECRET = "worker-only-unsubscribe-secret"


@dataclass
class Stack:
    svc: Service
    graph: GraphFake
    graph_url: str
    namespace: Path
    outside: Path


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path: Path) -> Iterator[Stack]:
    graph = GraphFake(app_secret="app-secret-attack")
    graph_url = graph.start()
    namespace, outside = tmp_path / "secrets" / "acme", tmp_path / "worker-secret"
    namespace.mkdir(parents=True)
    outside.write_text(WORKER_SECRET + "\n")
    (namespace / "wa_token").write_text(graph.access_token + "\n")
    svc = start_service(
        url_of(db),
        tmp_path,
        {  # not development mode
            "DISPATCHER_WHATSAPP_APP_SECRET": graph.app_secret,
            "DISPATCHER_UNSUBSCRIBE_SECRET": WORKER_SECRET,
            f"{PREFIX}WA_TOKEN": graph.access_token,
        },
    )
    graph.webhook_url = f"{svc.base_url}/public/webhooks/whatsapp"
    with psycopg.connect(svc.db_url, autocommit=True) as conn:  # the operator's grant: a namespace, public endpoints only
        call(conn, "notify_api.set_provider_grants_v1(%s, %s, %s, false)", svc.tenant_id, PREFIX, f"{namespace}/")
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        assert (
            c.post(
                "/internal/recipients/runner-42/consents", json={"channel": "whatsapp", "status": "granted", "source": "form"}
            ).status_code
            == 201
        )
    yield Stack(svc, graph, graph_url, namespace, outside)
    stop_service(svc)
    graph.stop()


def whatsapp(
    stack: Stack,
    *,
    token: str = f"env:{PREFIX}WA_TOKEN",
    base_url: str = "https://157.240.1.1",  # public: no DNS needed
    key: str | None = None,
    phone: str | None = None,
) -> httpx.Response:
    with stack.svc.client(key) as c:
        return c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "secrets": {"access_token": token},
                "settings": {"phone_number_id": phone or stack.graph.phone_number_id, "base_url": base_url, "timeout_seconds": 2},
            },
        )


def refused(response: httpx.Response, problem: str, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"].endswith(f":{problem}") and body["field"] == field, body


def send_one(stack: Stack) -> dict:
    """Submits a WhatsApp notification and waits for the worker's first attempt at it."""
    with stack.svc.client() as c:
        nid = c.post("/internal/notifications", json=intent(channels=["whatsapp"])).json()["id"]
    return stack.svc.wait_for(
        nid, lambda b: b["deliveries"][0].get("attempt_history") and b["deliveries"][0]["attempt_history"][0].get("outcome")
    )["deliveries"][0]


def write_directly(stack: Stack, settings: dict, secrets: dict) -> None:
    """A row as an older version (or anything but set_channel_provider_v1) wrote it: no save-time check."""
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:
        conn.execute(
            "insert into notify.channel_providers (tenant_id, channel, provider, settings, secrets) "
            "values (%s, 'whatsapp', 'whatsapp_cloud', %s, %s)",
            (
                stack.svc.tenant_id,
                Jsonb({"phone_number_id": stack.graph.phone_number_id, "api_version": "v22.0", "timeout_seconds": 2, **settings}),
                Jsonb(secrets),
            ),
        )


# (a) the worker's own secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "env:DATABASE_URL",
        "env:DISPATCHER_UNSUBSCRIBE_SECRET",
        "env:DISPATCHER_WHATSAPP_APP_SECRET",
        "env:NOTIFY_TENANT_ACMEX_TOKEN",
        f"env:{PREFIX}",
    ],
)
def test_a_tenant_admin_cannot_name_the_workers_environment(stack: Stack, token: str) -> None:
    refused(whatsapp(stack, token=token), "secret_not_allowed", "secrets.access_token")
    # inside its namespace it works, and the list shows the reference's name (not a secret), never a value
    assert whatsapp(stack).status_code == 200
    with stack.svc.client() as c:
        listed = c.get("/internal/channels/providers")
    assert {p["channel"]: p for p in listed.json()}["whatsapp"]["secrets"] == {"access_token": f"env:{PREFIX}WA_TOKEN"}
    assert stack.graph.access_token not in listed.text


# (b) files outside the namespace ------------------------------------------------------------------------------


def test_a_tenant_admin_cannot_name_files_outside_its_directory(stack: Stack) -> None:
    for ref in (
        "file:/etc/passwd",
        f"file:{stack.namespace}/../../worker-secret",
        f"file:{stack.namespace}/./x",
        f"file:{stack.outside}",
        f"file:{stack.namespace}x/token",
    ):
        refused(whatsapp(stack, token=ref), "secret_not_allowed", "secrets.access_token")
    assert whatsapp(stack, token=f"file:{stack.namespace}/wa_token").status_code == 200


def test_a_symlink_out_of_the_namespace_is_never_read(stack: Stack) -> None:
    """The path is inside the directory, so the database takes it; the worker resolves it before reading and refuses."""
    (stack.namespace / "escape").symlink_to(stack.outside)
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:  # let the fake be reached: only the secret is at stake
        call(conn, "notify_api.set_provider_grants_v1(%s, %s, %s, true)", stack.svc.tenant_id, PREFIX, f"{stack.namespace}/")
    assert whatsapp(stack, token=f"file:{stack.namespace}/escape", base_url=stack.graph_url).status_code == 200
    d = send_one(stack)
    assert d["attempt_history"][0]["error_code"] == "secret_not_allowed" and d["status"] == "queued"
    assert stack.graph.requests == []  # nothing left the worker, so the worker's secret went nowhere


# (c) internal hosts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:{port}",
        "https://127.0.0.1:{port}",
        "https://localhost:{port}",
        "https://169.254.169.254",
        "https://[::1]:{port}",
        "https://metadata.internal",
    ],
)
def test_a_tenant_admin_cannot_point_whatsapp_at_an_internal_host(stack: Stack, base_url: str) -> None:
    port = stack.graph_url.rsplit(":", 1)[1]
    refused(whatsapp(stack, base_url=base_url.format(port=port)), "unsafe_endpoint", "settings.base_url")


@pytest.mark.parametrize("base_url", ["{url}", "{localhost}"])
def test_the_worker_never_sends_the_token_to_an_internal_host_saved_by_an_older_version(stack: Stack, base_url: str) -> None:
    """Checked again at send time (DNS included: localhost resolves to loopback)."""
    url = base_url.format(url=stack.graph_url, localhost=stack.graph_url.replace("127.0.0.1", "localhost"))
    write_directly(stack, {"base_url": url}, {"access_token": f"env:{PREFIX}WA_TOKEN"})
    d = send_one(stack)
    assert d["attempt_history"][0]["error_code"] == "unsafe_endpoint" and d["status"] == "queued"
    assert stack.graph.requests == []


def test_the_worker_never_reads_a_secret_outside_the_namespace_saved_by_an_older_version(stack: Stack) -> None:
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:  # the fake may be reached: only the secret is at stake
        call(conn, "notify_api.set_provider_grants_v1(%s, %s, null, true)", stack.svc.tenant_id, PREFIX)
    write_directly(stack, {"base_url": stack.graph_url}, {"access_token": "env:DISPATCHER_UNSUBSCRIBE_SECRET"})
    d = send_one(stack)
    assert d["attempt_history"][0]["error_code"] == "secret_not_allowed"
    assert stack.graph.requests == []


# (d) another tenant's business number -------------------------------------------------------------------------


def test_a_second_tenant_cannot_claim_the_first_tenants_phone_number_id(stack: Stack) -> None:
    assert whatsapp(stack).status_code == 200
    key = keys.generate()
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:
        beta = call(conn, "notify_api.create_tenant_v1('beta')")["id"]
        call(conn, "notify_api.create_api_key_v1(%s, 'beta', %s, %s)", beta, keys.display_prefix(key), keys.digest(key))
        call(conn, "notify_api.set_provider_grants_v1(%s, 'NOTIFY_TENANT_BETA_', null, false)", beta)
    refused(
        whatsapp(stack, key=key, token="env:NOTIFY_TENANT_BETA_WA_TOKEN"), "phone_number_taken", "settings.phone_number_id", 409
    )
    assert whatsapp(stack, key=key, token="env:NOTIFY_TENANT_BETA_WA_TOKEN", phone="109000000000001").status_code == 200
    # inbound messages (the 24-hour window, STOP) are routed by the number: they reach the first tenant only
    assert stack.graph.inbound("+34600111222", "hola") == 200
    with psycopg.connect(stack.svc.db_url) as conn:
        assert conn.execute("select array_agg(distinct tenant_id::text) from notify.whatsapp_windows").fetchone()[0] == [
            stack.svc.tenant_id
        ]


# (e) its own namespace ----------------------------------------------------------------------------------------


def test_a_tenant_admin_cannot_set_its_own_secret_namespace(stack: Stack) -> None:
    with stack.svc.client() as c:  # no route takes a namespace, and the provider body has no place for one
        body = {
            "provider": "whatsapp_cloud",
            "secrets": {"access_token": "env:DATABASE_URL"},
            "settings": {"phone_number_id": stack.graph.phone_number_id, "env_prefix": ""},
        }
        assert c.put("/internal/channels/whatsapp/provider", json=body).status_code in (400, 422)
        assert (
            c.put("/internal/channels/whatsapp/provider", json={**body, "grants": {"env_prefix": "DATABASE_"}}).status_code == 400
        )
        for path in ("/internal/tenant/secrets", "/internal/provider-grants", "/internal/channels/whatsapp/grants"):
            assert c.put(path, json={"env_prefix": "DATABASE_", "private_endpoints": True}).status_code in (404, 405)
    # the API's own database role (what a tenant admin's requests run as) may not call the operator's function either
    with psycopg.connect(app_url(stack.svc.db_url), autocommit=True) as api_role:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api_role.execute("select notify_api.set_provider_grants_v1(%s, 'DATABASE_', null, true)", (stack.svc.tenant_id,))
        grants = api_role.execute("select notify_api.get_provider_grants_v1(%s)", (stack.svc.tenant_id,)).fetchone()[0]
    assert grants["env_prefix"] == PREFIX and grants["private_endpoints"] is False
    refused(whatsapp(stack, token="env:DATABASE_URL"), "secret_not_allowed", "secrets.access_token")
