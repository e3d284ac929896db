"""notify._uuidv7: the time-ordered ids new deliveries get (docs/architecture.md, "Delivery ids are time-ordered")."""

from __future__ import annotations

import time
import uuid

from tests.conftest import intent, submit


def test_ids_are_version_7_with_the_current_time_and_random_bits(db):
    before = int(time.time() * 1000)
    ids = [r[0] for r in db.execute("select notify._uuidv7() from generate_series(1, 1000)").fetchall()]
    after = int(time.time() * 1000)
    assert len(set(ids)) == 1000
    for u in ids:
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before - 5 <= int.from_bytes(u.bytes[:6], "big") <= after + 5  # 48-bit Unix milliseconds
    if db.info.server_version >= 170000:  # Postgres reads the same version and time from them as from its own v7 ids
        row = db.execute(
            "select uuid_extract_version(notify._uuidv7()),"
            " abs(extract(epoch from uuid_extract_timestamp(notify._uuidv7()) - clock_timestamp()))"
        ).fetchone()
        assert row[0] == 7 and row[1] < 1


def test_later_ids_sort_after_earlier_ones(db):
    first = db.execute("select notify._uuidv7()").fetchone()[0]
    time.sleep(0.005)
    second = db.execute("select notify._uuidv7()").fetchone()[0]
    assert first < second  # uuid order is byte order: the timestamp leads


def test_new_deliveries_get_time_ordered_ids(db, ready):
    ids = []
    for _ in range(2):
        submit(db, ready, intent(channels=["email"]))
        ids += [r[0] for r in db.execute("select id from notify.notification_deliveries where not (id = any (%s))", (ids,))]
        time.sleep(0.005)
    assert [u.version for u in ids] == [7, 7]
    assert ids[0] < ids[1]  # the second submission's delivery sorts after the first's
