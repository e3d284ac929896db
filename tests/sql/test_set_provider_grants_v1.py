"""notify_api.set_provider_grants_v1: the operator's grant decides which secrets and endpoints a tenant may use."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call
from tests.sql.test_set_channel_provider_v1 import WA, grant, set_provider


def test_the_operator_grant_decides_which_secrets_a_tenant_may_name(db, tenant):
    body = {**WA, "secrets": {"access_token": "env:TEST_WA_TOKEN"}}
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, "whatsapp", body, granted=False)  # no grant: no secrets at all
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("secret_not_allowed", "secrets.access_token")
    grant(db, tenant, "NOTIFY_TENANT_ACME_", "/run/secrets/acme/")
    for ref in (
        "env:TEST_WA_TOKEN",
        "env:NOTIFY_TENANT_ACME_",
        "env:DATABASE_URL",
        "file:/etc/passwd",
        "file:/run/secrets/acme/../x",
        "file:/run/secrets/acme/./x",
        "file:/run/secrets/acme//x",
        "file:/run/secrets/acmex/t",
        "file:/run/secrets/acme/",
    ):
        with pytest.raises(psycopg.Error) as info:
            set_provider(db, tenant, "whatsapp", {**WA, "secrets": {"access_token": ref}}, granted=False)
        assert info.value.diag.constraint_name == "secret_not_allowed", ref
    for ref in ("env:NOTIFY_TENANT_ACME_WA_TOKEN", "file:/run/secrets/acme/wa/token"):
        assert set_provider(db, tenant, "whatsapp", {**WA, "secrets": {"access_token": ref}}, granted=False)["secrets"] == {
            "access_token": ref
        }


@pytest.mark.parametrize(
    ("env_prefix", "file_dir", "field"),
    [
        ("DATABASE_", None, "env_prefix"),
        ("DISPATCHER_", None, "env_prefix"),
        ("PGPASS", None, "env_prefix"),
        ("A_", None, "env_prefix"),
        ("NO_UNDERSCORE", None, "env_prefix"),
        (None, "/run/secrets/acme", "file_dir"),
        (None, "/run/secrets/../", "file_dir"),
        (None, "relative/", "file_dir"),
    ],
)
def test_a_bad_namespace_is_refused(db, tenant, env_prefix, file_dir, field):
    with pytest.raises(psycopg.Error) as info:
        grant(db, tenant, env_prefix, file_dir)
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("invalid_secret_namespace", field)


def test_namespaces_of_two_tenants_may_not_overlap(db, tenant):
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    grant(db, tenant, "NT_ACME_", "/run/secrets/acme/")
    for env_prefix, file_dir, field in (
        ("NT_ACME_X_", None, "env_prefix"),
        ("NT_", None, "env_prefix"),
        (None, "/run/secrets/acme/x/", "file_dir"),
        (None, "/run/secrets/", "file_dir"),
    ):
        with pytest.raises(psycopg.Error) as info:
            grant(db, other, env_prefix, file_dir)
        assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("secret_namespace_overlaps", field)
    assert grant(db, other, "NT_OTHER_", "/run/secrets/other/")["env_prefix"] == "NT_OTHER_"


def test_two_grants_at_once_cannot_both_pass_the_overlap_check(db, connect, tenant):
    """Scripted: A grants NT_A_ to one tenant and has not committed; B grants NT_A_B_ (inside A's namespace) to
    another. B must wait for A and then be refused; without the lock both committed, and one tenant could read the
    other's secrets."""
    import threading

    other = str(call(db, "notify_api.create_tenant_v1('beta', 'Beta', 'en')")["id"])
    a, b = connect(), connect()
    a.execute("select notify_api.set_provider_grants_v1(%s, 'NT_A_', null, false)", (tenant,))
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            b.execute("select notify_api.set_provider_grants_v1(%s, 'NT_A_B_', null, false)", (other,))
            b.commit()
            outcome["b"] = "committed"
        except psycopg.Error as exc:
            b.rollback()
            outcome["b"] = exc.diag.constraint_name

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), "B did not wait for A's uncommitted grant"
    a.commit()
    thread.join(10)
    assert outcome["b"] == "secret_namespace_overlaps"
    rows = db.execute("select env_prefix from notify.provider_grants order by env_prefix").fetchall()
    assert rows == [("NT_A_",)]
