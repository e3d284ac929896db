"""The worker's periodic retention task, as a deployment runs it (the worker process, logged in as dispatcher_app): a
partition past the longest history period goes, and the run is logged without personal data."""

from __future__ import annotations

import json
import time

from tests.conftest import start_service, stop_service, url_of


def test_the_worker_drops_a_partition_past_the_longest_history_period(db, tmp_path):
    svc = start_service(url_of(db), tmp_path, {"DISPATCHER_RETENTION_CRON": "* * * * * */2"})
    try:
        call = "select notify_api.set_retention_v1(%s, '{\"history_days\": 100}')"
        db.execute(call, (svc.tenant_id,))
        db.execute("select notify._ensure_partitions(current_date - 200, current_date - 100)")
        old = "select to_regclass('notify.delivery_events_p' || to_char(current_date - %s, 'YYYYMMDD')) is not null"
        assert db.execute(old, (200,)).fetchone()[0] and db.execute(old, (100,)).fetchone()[0]
        deadline = time.monotonic() + 40
        while db.execute(old, (200,)).fetchone()[0]:
            assert time.monotonic() < deadline, svc.log_text()[-3000:]
            time.sleep(0.3)
        assert db.execute(old, (100,)).fetchone()[0]  # its day ended less than 100 days ago
        time.sleep(0.5)
        runs = [json.loads(line) for line in svc.log_text().splitlines() if '"event":"retention"' in line]
        assert runs and runs[0]["longest_history_days"] == 100 and "delivery_events_p" in " ".join(runs[0]["partitions_dropped"])
    finally:
        stop_service(svc)
