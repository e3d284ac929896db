"""notify_api.ingest_webhook_v1, WhatsApp's account-level updates (p_updates): user_id_update moves a tenant's addresses,
waiting deliveries and windows to the new business-scoped user id, and only the tenant of the number it names;
template_category_update follows completed changes only; messaging_tier is kept per business account."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit
from tests.sql.test_set_channel_provider_v1 import WA, grant, set_provider

OLD, NEW = "US.13491208655302741918", "US.77700011122233344455"
UPDATES = "select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, '{}', array[]::notify.status_event[], '{}', '{}', %s)"


def ingest(db, key: str, *updates: dict) -> list[dict]:  # noqa: ANN001
    return db.execute(UPDATES, (key, Jsonb(list(updates)))).fetchone()[0]["outcomes"]


def test_a_user_id_update_moves_addresses_waiting_deliveries_and_windows_of_that_numbers_tenant_only(db, ready):  # noqa: ANN001
    set_provider(db, ready, "whatsapp", WA)
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])  # another portfolio: the same id string is not its user
    grant(db, other, env_prefix="OTHER_")
    set_provider(
        db,
        other,
        "whatsapp",
        {**WA, "settings": {"phone_number_id": "999000111222333"}, "secrets": {"access_token": "env:OTHER_WA_TOKEN"}},
        granted=False,
    )
    for tenant in (ready, other):
        call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", tenant, Jsonb({"addresses": {"whatsapp": OLD}}))
    db.execute("insert into notify.whatsapp_windows values (%s, '106540352242922', %s, now())", (ready, OLD))
    response, _ = submit(db, ready, intent(channels=["whatsapp"], recipient={"ref": "runner-42"}))
    assert response["deliveries"][0]["status"] == "queued"

    out = ingest(
        db, "u-1", {"kind": "user_id_update", "phone_number_id": "106540352242922", "user_id": NEW, "previous_user_id": OLD}
    )
    assert out == [{"update": "user_id_update", "outcome": "user_id_updated"}]
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["addresses"]["whatsapp"] == NEW
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", other)["addresses"]["whatsapp"] == OLD
    assert db.execute("select address from notify.notification_deliveries where tenant_id = %s", (ready,)).fetchone() == (NEW,)
    assert db.execute(
        "select count(*) from notify.whatsapp_windows where tenant_id = %s and wa_id = %s", (ready, NEW)
    ).fetchone() == (1,)
    # consent belongs to the recipient: unchanged
    assert response["deliveries"][0].get("reason") is None

    assert ingest(db, "u-2", {"kind": "user_id_update", "phone_number_id": "555", "user_id": NEW}) == [
        {"update": "user_id_update", "outcome": "no_tenant"}
    ]
    assert ingest(db, "u-3", {"kind": "user_id_update", "phone_number_id": "106540352242922", "user_id": "+34600"}) == [
        {"update": "user_id_update", "outcome": "ignored"}
    ]


def test_template_categories_follow_completed_changes_of_the_business_account(db, tenant):  # noqa: ANN001
    set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "waba_id": "102290129340398"}})
    body = {"locale": "en", "channels": {"whatsapp": {"name": "promo", "language": "en", "category": "utility"}}}
    call(db, "notify_api.upsert_template_v1(%s, 'promo', %s)", tenant, Jsonb(body))
    change = {
        "kind": "template_category_update",
        "waba_id": "102290129340398",
        "name": "promo",
        "language": "en",
        "new_category": "marketing",
    }
    assert ingest(db, "c-1", {**change, "correct_category": "marketing"})[0]["outcome"] == "category_update_impending"
    assert call(db, "notify_api.list_templates_v1(%s, 'promo')", tenant)[0]["content"]["category"] == "utility"
    assert ingest(db, "c-2", {**change, "previous_category": "utility"})[0]["outcome"] == "category_updated"
    [tpl] = call(db, "notify_api.list_templates_v1(%s, 'promo')", tenant)
    assert (tpl["content"]["category"], tpl["version"]) == ("marketing", 2)
    assert ingest(db, "c-3", {**change, "previous_category": "utility", "waba_id": "1"})[0]["outcome"] == "no_tenant"


def test_the_messaging_tier_is_kept_per_business_account_and_listed(db, tenant):  # noqa: ANN001
    set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "waba_id": "102290129340398"}})
    tier = {"kind": "messaging_tier", "waba_id": "102290129340398", "tier": "TIER_2K", "payload": {"x": 1}}
    assert ingest(db, "t-1", tier)[0]["outcome"] == "tier_recorded"
    assert ingest(db, "t-2", {**tier, "tier": "TIER_10K"})[0]["outcome"] == "tier_recorded"
    rows = db.execute("select tenant, waba_id, messaging_tier from notify_api.whatsapp_limits_v1()").fetchall()
    assert rows == [("acme", "102290129340398", "TIER_10K")]
