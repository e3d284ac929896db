"""A/B of the claim statement (issue #14, policies): `python -m bench.claim_ab [--base REV] [--mode none|other|own]`.

The same LIMIT queued e-mail deliveries are claimed and rolled back ROUNDS times by each of two versions of
notify_api.claim_deliveries_v1, alternating A B B A in one database: the base revision's (installed beside it as
notify_api.claim_deliveries_base) and the working tree's. Prints the median and first-quartile milliseconds per claim
and their ratio. Modes: none (no tenant has a policy), other (another tenant has quiet hours and a cap), own (the
claiming tenant has a cap: the price of the policy itself). Everything else (API, worker, provider) is left out, so the
ratio is the claim's own; a whole dispatch dilutes it further.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", module="platformdirs")

from dispatcher import schema  # noqa: E402
from dispatcher.embedded import EmbeddedPostgres  # noqa: E402
from runner.drainer import CLAIM  # noqa: E402

CAP = '{"caps": [{"max": 3, "period": "P1D"}]}'
QUIET = '{"start": "21:00", "end": "08:00"}'


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="main", help="the git revision whose claim is A")
    parser.add_argument("--mode", choices=["none", "other", "own"], default="none")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--providers", type=int, default=0, help="SMTP relays in the tenant's e-mail chain (0: none, the mock)")
    args = parser.parse_args()
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{args.base}:sql/080_api_worker.sql"], capture_output=True, text=True, check=True
    )
    base = re.search(r"create function notify_api\.claim_deliveries_v1\(.*?^\$\$;", old.stdout, re.S | re.M)
    assert base, "no claim_deliveries_v1 in the base revision"
    # The base's own result type, if the tree's has changed since (migration 0046 added provider_position, fallbacks).
    types = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{args.base}:sql/010_types.sql"], capture_output=True, text=True, check=True
    )
    base_type = re.search(r"create type notify\.claimed_delivery as \(.*?\);", types.stdout, re.S)
    assert base_type, "no claimed_delivery in the base revision"
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="claim-ab-")) / "data")
    with psycopg.connect(pg.ensure_database("ab"), autocommit=True) as conn:
        schema.build_from_sql(conn)
        conn.execute(base_type.group(0).replace("notify.claimed_delivery", "notify.claimed_delivery_base"))  # type: ignore[arg-type]
        conn.execute(
            base.group(0)  # type: ignore[arg-type]
            .replace("notify_api.claim_deliveries_v1(", "notify_api.claim_deliveries_base(", 1)
            .replace("setof notify.claimed_delivery", "setof notify.claimed_delivery_base", 1)
        )
        conn.execute("alter function notify_api.claim_deliveries_base(notify.channel, integer, integer) owner to notify_system")
        tenant = conn.execute("select notify_api.create_tenant_v1('ab')").fetchone()[0]["id"]  # type: ignore[index]
        template = {"locale": "en", "channels": {"email": {"subject": "R {{event}}", "text": "Hi {{name}}"}}}
        conn.execute("select notify_api.upsert_template_v1(%s, 'event_reminder', %s)", (tenant, Jsonb(template)))
        relays = [
            {"provider": "smtp", "settings": {"host": f"smtp{i}.example.com", "from_address": "club@example.com"}}
            for i in range(args.providers)
        ]
        if len(relays) == 1:
            conn.execute("select notify_api.set_channel_provider_v1(%s, 'email', %s)", (tenant, Jsonb(relays[0])))
        elif relays:
            conn.execute("select notify_api.set_channel_providers_v1(%s, 'email', %s)", (tenant, Jsonb(relays)))
        other = conn.execute("select notify_api.create_tenant_v1('other')").fetchone()[0]["id"]  # type: ignore[index]
        if args.mode == "other":
            conn.execute("select notify_api.set_quiet_hours_v1(%s, %s)", (other, QUIET))
            conn.execute("select notify_api.set_frequency_caps_v1(%s, %s)", (other, CAP))
        if args.mode == "own":
            conn.execute("select notify_api.set_frequency_caps_v1(%s, %s)", (tenant, CAP))
        recipients = [
            {"ref": f"r-{i}", "addresses": {"email": f"r{i}@example.com"}, "variables": {"name": "M"}} for i in range(args.limit)
        ]
        body = {"recipients": recipients, "channels": ["email"], "template": "event_reminder", "variables": {"event": "x"}}
        conn.execute("select notify_api.submit_notification_v1(%s, %s, null)", (tenant, Jsonb(body)))
        conn.execute("vacuum analyze")
        times: dict[str, list[float]] = {"base": [], "tree": []}
        for i in range(args.rounds):
            name = ("base", "tree", "tree", "base")[i % 4]
            query = (
                CLAIM.replace("notify_api.claim_deliveries_v1", "notify_api.claim_deliveries_base") if name == "base" else CLAIM
            )
            with conn.transaction(force_rollback=True):
                started = time.perf_counter()
                rows = conn.execute(query, {"channel": "email", "limit": args.limit, "lease": 60}).fetchall()  # type: ignore[arg-type]
                times[name].append((time.perf_counter() - started) * 1000)
                assert len(rows) == args.limit
    pg.stop()
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    q1 = {k: round(statistics.quantiles(v, n=4)[0], 2) for k, v in times.items()}
    ratios = {"ratio_median": round(median["tree"] / median["base"], 3), "ratio_q1": round(q1["tree"] / q1["base"], 3)}
    print(
        json.dumps(
            {"mode": args.mode, "providers": args.providers, "limit": args.limit, "median_ms": median, "q1_ms": q1, **ratios}
        )
    )


if __name__ == "__main__":
    main()
