"""notify_api.rotate_callback_secret_v1: a new signing secret; both sign until the overlap ends."""

from __future__ import annotations

import psycopg
import pytest

from providers.standard_webhooks import new_secret
from tests.conftest import call, intent, submit
from tests.sql.callbacks import claim_callbacks, configure


def test_both_secrets_sign_during_the_overlap_and_only_the_new_one_after(db, ready):
    old = configure(db, ready)["secret"]
    rotated = call(db, "notify_api.rotate_callback_secret_v1(%s, %s, 3600)", ready, new_secret())
    assert rotated["secret"] != old and rotated["previous_secret_valid_until"]
    submit(db, ready, intent(channels=["email"]))
    assert [c[5] for c in claim_callbacks(db)] == [[rotated["secret"], old]]
    newest = call(db, "notify_api.rotate_callback_secret_v1(%s, %s, 0)", ready, new_secret())["secret"]
    db.execute("update notify.callback_messages set status = 'pending', next_attempt_at = now()")
    assert [c[5] for c in claim_callbacks(db)] == [[newest]]


@pytest.mark.parametrize("overlap", [-1, 604_801])
def test_the_overlap_is_bounded(db, tenant, overlap):
    configure(db, tenant)
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.rotate_callback_secret_v1(%s, %s, %s)", tenant, new_secret(), overlap)
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "overlap_seconds"


def test_without_callbacks_it_is_404(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.rotate_callback_secret_v1(%s, %s, 60)", tenant, new_secret())
    assert err.value.sqlstate == "ND404"


def test_a_secret_that_is_not_whsec_is_refused(db, tenant):
    configure(db, tenant)
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.rotate_callback_secret_v1(%s, 'plain', 60)", tenant)
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "secret"
