"""The `dispatcher` command: dev, migrate, psql, serve, worker, tenant, key, provider.

    dispatcher dev [--port N]          embedded Postgres (if DATABASE_URL is unset) + migrate + dev tenant/key + API + worker
    dispatcher migrate                 apply pending migrations to DATABASE_URL
    dispatcher psql [PSQL ARGS]        psql on DATABASE_URL (or the running dev database), as its owner
    dispatcher status [--json]         queue health per tenant and channel
    dispatcher serve [--port N]        the HTTP API (uvicorn)
    dispatcher worker                  the procrastinate worker (same as: procrastinate --app=runner.app.app worker)
    dispatcher tenant create SLUG      create a tenant
    dispatcher tenant secrets --tenant S [--env-prefix P] [--file-dir D] [--private-endpoints|--public-endpoints-only]
                                       what a tenant's provider settings may use (operator only)
    dispatcher key create --tenant S   create an API key and print it once
    dispatcher key revoke --tenant S ID
    dispatcher key rotate --tenant S ID [--overlap-seconds N]
    dispatcher key list --tenant S
    dispatcher provider set --tenant S --channel C --provider P [--setting K=V] [--secret K=env:VAR]
    dispatcher provider chain --tenant S --channel C '[{"provider": ...}, ...]'
    dispatcher provider list --tenant S
    dispatcher login bind --login NAME --tenant S     bind a database login to a tenant (it then enters only its tenants)
    dispatcher login unbind --login NAME --tenant S
    dispatcher login list [--login NAME]
    dispatcher notifications find --tenant S [--recipient R] [--status X] [--channel C] [--category K] [--template T]
                                  [--since TS] [--until TS] [--idempotency-key K] [--metadata K=V] [--limit N] [--cursor C]
    dispatcher notifications show --tenant S ID [--json]      a notification with its timeline
    dispatcher notifications preview --tenant S FILE|- [--json]  dry run of a submission body: would it send, and if not why
    dispatcher deliveries resolve --tenant S ID --status sent|failed --note TEXT   end an unknown outcome by hand
    dispatcher recipients export --tenant S REF               everything held about a recipient (JSON)
    dispatcher recipients erase --tenant S REF --yes          erase its personal data; prints the receipt

Every command but dev and serve/worker finds its database the same way (`_url`): DATABASE_URL if set; otherwise the
dev database that `dispatcher dev` runs in its data folder (--data-dir, DISPATCHER_DATA_DIR, default ./.dispatcher),
if it is running. The CLI never starts the dev server itself: a server it started would stop when it exits, and
one it left running would outlive the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from dispatcher import keys, logs, schema
from dispatcher import settings as declared

log = logging.getLogger("dispatcher")


# The dev stack's database, and the logins it uses: the API, the worker and the admin commands log in as
# DEV_APP_LOGIN (a notify_service member, like deploy/postgres-init.sql's dispatcher_app), migrations and psql as
# the embedded server's superuser (the owner, like the migrating role in production).
DEV_DATABASE = "dispatcher"
DEV_APP_LOGIN = "dispatcher_app"
DEV_OWNER_LOGIN = "postgres"


def _data_dir(args: argparse.Namespace | None) -> Path:
    return Path(getattr(args, "data_dir", None) or declared.read("data_dir"))


def _url(args: argparse.Namespace | None = None, *, owner: bool = False) -> str:
    """DATABASE_URL, else the running dev database in the data folder (as the app login, or as its owner)."""
    url = declared.read("database_url")
    if url:
        return url
    from dispatcher.embedded import running_server, socket_url

    data_dir = _data_dir(args)
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        raise SystemExit(
            f"error: DATABASE_URL is not set and there is no dev database in {data_dir}/ "
            "(set DATABASE_URL, or start the dev stack: dispatcher dev)"
        )
    found = running_server(pgdata.resolve())
    if found is None:
        raise SystemExit(
            f"error: DATABASE_URL is not set and the dev database in {data_dir}/ is not running "
            "(start it with `dispatcher dev` in another terminal, or set DATABASE_URL)"
        )
    return socket_url(*found, DEV_OWNER_LOGIN if owner else DEV_APP_LOGIN, DEV_DATABASE)


def _tenant_id(conn: psycopg.Connection, slug: str) -> str:
    row = conn.execute("select notify_api.get_tenant_v1(%s)", (slug,)).fetchone()
    if not row or row[0] is None:
        raise SystemExit(f"no tenant {slug!r} (create it with: dispatcher tenant create {slug})")
    return str(row[0]["id"])


def cmd_migrate(args: argparse.Namespace) -> None:
    applied = schema.migrate(_url(args, owner=True))
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "database is up to date")


def cmd_psql(args: argparse.Namespace) -> None:
    """Replaces this process by psql (the embedded server's own binary where the wheel is installed)."""
    import shutil

    from dispatcher.embedded import psql_binary

    url = _url(args, owner=True)
    binary = psql_binary((_data_dir(args) / "pgdata").resolve()) or shutil.which("psql")
    if binary is None:
        raise SystemExit("error: no psql: install the embedded extra (pip install -e '.[embedded]') or a PostgreSQL client")
    sys.stdout.flush()
    os.execv(binary, [binary, url, *args.psql_args])


def cmd_tenant_create(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.create_tenant_v1(%s, %s, %s)", (args.slug, args.name, args.locale)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def grant_provider_use(
    conn: psycopg.Connection, tenant_id: str, env_prefix: str | None, file_dir: str | None, private_endpoints: bool | None
) -> dict:
    """Changes what the operator lets a tenant's providers use; None keeps the current value, "" clears a namespace."""
    current = conn.execute("select notify_api.get_provider_grants_v1(%s)", (tenant_id,)).fetchone()[0]  # type: ignore[index]
    row = conn.execute(
        "select notify_api.set_provider_grants_v1(%s, %s, %s, %s)",
        (
            tenant_id,
            current["env_prefix"] if env_prefix is None else env_prefix or None,
            current["file_dir"] if file_dir is None else file_dir or None,
            current["private_endpoints"] if private_endpoints is None else private_endpoints,
        ),
    ).fetchone()
    assert row is not None
    return row[0]


def cmd_tenant_secrets(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args, owner=True), autocommit=True) as conn:
        out = grant_provider_use(conn, _tenant_id(conn, args.tenant), args.env_prefix, args.file_dir, args.private_endpoints)
    print(json.dumps(out, indent=2))


def create_key(
    conn: psycopg.Connection,
    tenant_id: str,
    name: str,
    key: str | None = None,
    scopes: list[str] | None = None,
    test: bool = False,
) -> tuple[str, dict]:
    key = key or keys.generate()
    row = conn.execute(
        "select notify_api.create_api_key_v1(%s, %s, %s, %s, %s, %s)",
        (tenant_id, name, keys.display_prefix(key), keys.digest(key), scopes or ["submit", "read", "admin"], test),
    ).fetchone()
    assert row is not None
    return key, row[0]


def cmd_key_create(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        key, info = create_key(conn, _tenant_id(conn, args.tenant), args.name, scopes=args.scope or None, test=args.test)
    kind = "test API key (sends through the mock provider only)" if info.get("test") else "API key"
    print(
        f"{kind} for tenant {args.tenant} (id {info['id']}, scopes {', '.join(info['scopes'])}); shown once, store it now:\n{key}"
    )


def cmd_key_rotate(args: argparse.Namespace) -> None:
    key = keys.generate()
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.rotate_api_key_v1(%s, %s, %s, %s, %s)",
            (_tenant_id(conn, args.tenant), args.key_id, keys.display_prefix(key), keys.digest(key), args.overlap_seconds),
        ).fetchone()
    info = row[0] if row else {}
    print(
        f"new API key (id {info.get('id')}) replaces {args.key_id}, which works until {info.get('old_key_expires_at')}; "
        f"shown once, store it now:\n{key}"
    )


def cmd_key_revoke(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.revoke_api_key_v1(%s, %s)", (_tenant_id(conn, args.tenant), args.key_id)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_key_list(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.list_api_keys_v1(%s)", (_tenant_id(conn, args.tenant),)).fetchone()
    print(json.dumps(row[0] if row else [], indent=2))


def _pairs(items: list[str], what: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{what} must be NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(raw) if what == "--setting" else raw
        except json.JSONDecodeError:
            out[name] = raw
    return out


def cmd_provider_set(args: argparse.Namespace) -> None:
    body = {"provider": args.provider, "settings": _pairs(args.setting, "--setting"), "secrets": _pairs(args.secret, "--secret")}
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.set_channel_provider_v1(%s, %s::notify.channel, %s)",
            (_tenant_id(conn, args.tenant), args.channel, Jsonb(body)),
        ).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_provider_chain(args: argparse.Namespace) -> None:
    """Replaces a channel's failover chain with the JSON array given (or read from a file with @path)."""
    text = Path(args.providers[1:]).read_text() if args.providers.startswith("@") else args.providers
    try:
        providers = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"providers must be a JSON array of {{provider, settings, secrets}}: {exc}") from None
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.set_channel_providers_v1(%s, %s::notify.channel, %s)",
            (_tenant_id(conn, args.tenant), args.channel, Jsonb(providers)),
        ).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_provider_list(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.list_channel_providers_v1(%s)", (_tenant_id(conn, args.tenant),)).fetchone()
    print(json.dumps(row[0] if row else [], indent=2))


def cmd_retention_show(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.get_retention_v1(%s)", (_tenant_id(conn, args.tenant),)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_retention_set(args: argparse.Namespace) -> None:
    body: dict[str, object] = {}
    if args.content_days is not None:
        body["content_days"] = args.content_days
    if args.history_days is not None:
        body["history_days"] = args.history_days
    channels: dict[str, dict[str, object]] = {}
    for field, items in (("content_days", args.channel_content), ("history_days", args.channel_history)):
        for channel, days in _pairs(items, "--setting").items():
            channels.setdefault(channel, {})[field] = days
    if channels:
        body["channels"] = channels
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.set_retention_v1(%s, %s)", (_tenant_id(conn, args.tenant), Jsonb(body))).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def _policy_call(args: argparse.Namespace, function: str, body: dict[str, object] | None = None) -> None:
    """Calls one of the policy functions (sql/077_api_policies.sql) for --tenant and prints the JSON it returns."""
    with psycopg.connect(_url(args), autocommit=True) as conn:
        params: tuple[object, ...] = (_tenant_id(conn, args.tenant),) + ((Jsonb(body),) if body is not None else ())
        placeholders = ", ".join(["%s"] * len(params))
        row = conn.execute(f"select notify_api.{function}({placeholders})", params).fetchone()  # type: ignore[arg-type]
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_quiet_hours_show(args: argparse.Namespace) -> None:
    _policy_call(args, "get_quiet_hours_v1")


def cmd_quiet_hours_set(args: argparse.Namespace) -> None:
    body: dict[str, object] = {}
    if args.timezone is not None:
        body["timezone"] = args.timezone
    if args.start is not None or args.end is not None:
        body["start"], body["end"] = args.start, args.end
    categories: dict[str, object] = {}
    for item in args.category:
        name, sep, window = item.partition("=")
        start, dash, end = window.partition("-")
        if not sep or not name or not dash:
            raise SystemExit(f"--category must be NAME=HH:MM-HH:MM, got {item!r}")
        categories[name] = {"start": start, "end": end}
    for name in args.exempt:
        categories[name] = {"exempt": True}
    if categories:
        body["categories"] = categories
    _policy_call(args, "set_quiet_hours_v1", body)


def cmd_quiet_hours_delete(args: argparse.Namespace) -> None:
    _policy_call(args, "delete_quiet_hours_v1")


def cmd_caps_show(args: argparse.Namespace) -> None:
    _policy_call(args, "get_frequency_caps_v1")


def cmd_caps_set(args: argparse.Namespace) -> None:
    caps: list[dict[str, object]] = []
    for spec in args.cap:
        cap: dict[str, object] = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name not in ("max", "period", "channel", "category", "action"):
                raise SystemExit(f"--cap must be max=N,period=P1D[,channel=C][,category=C][,action=suppress|hold], got {spec!r}")
            cap[name] = int(value) if name == "max" and value.isdigit() else value
        caps.append(cap)
    _policy_call(args, "set_frequency_caps_v1", {"caps": caps})


def cmd_caps_delete(args: argparse.Namespace) -> None:
    _policy_call(args, "delete_frequency_caps_v1")


def cmd_retention_run(args: argparse.Namespace) -> None:
    """What the worker's retention task does, once, now: partitions ahead and dropped, then scrub batches (a transaction each)."""
    with psycopg.connect(_url(args), autocommit=True) as conn:
        result = conn.execute("select notify_api.run_retention_v1()").fetchone()[0]
        totals: dict[str, int] = {}
        while True:
            batch = conn.execute("select notify_api.scrub_expired_v1(1000)").fetchone()[0]
            more = batch.pop("more")
            for kind, n in batch.items():
                totals[kind] = totals.get(kind, 0) + n
            if not more:
                break
    result["scrubbed"] = totals
    print(json.dumps(result, indent=2))


def cmd_login_bind(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args, owner=True), autocommit=True) as conn:
        row = conn.execute("select notify.bind_login_v1(%s, %s)", (args.login, args.tenant)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_login_unbind(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args, owner=True), autocommit=True) as conn:
        row = conn.execute("select notify.unbind_login_v1(%s, %s)", (args.login, args.tenant)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_login_list(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args, owner=True), autocommit=True) as conn:
        row = conn.execute("select notify.list_login_bindings_v1(%s)", (args.login,)).fetchone()
    print(json.dumps(row[0] if row else [], indent=2))


def _whatsapp_tiers(conn: psycopg.Connection) -> list[tuple]:
    """Each tenant's WhatsApp portfolio messaging tier, when Meta reported one (business_capability_update)."""
    return conn.execute("select tenant, waba_id, messaging_tier, reported_at from notify_api.whatsapp_limits_v1()").fetchall()


def _provider_health(conn: psycopg.Connection) -> list[tuple]:
    """Chained providers with recent "not sent" errors or a demotion in force (notify.provider_health)."""
    return conn.execute(
        "select tenant, channel::text, position, provider, errors, demoted, demoted_until, last_error_code"
        " from notify_api.provider_health_v1()"
    ).fetchall()


def cmd_status(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        rows = conn.execute("select * from notify_api.queue_health_v1()").fetchall()
        tiers = _whatsapp_tiers(conn)
        health = _provider_health(conn)
    if args.json:
        cols = ["tenant", "channel", "due", "scheduled", "oldest_due_seconds", "sending", "leases_past_due", "unknown"]
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], indent=2, default=str))
        return
    for tenant, waba_id, tier, at in tiers:
        reported = at.isoformat(timespec="minutes")
        print(f"whatsapp messaging tier: tenant {tenant} business account {waba_id or '?'}: {tier or 'unknown'} ({reported})")
    for tenant, channel, position, provider, errors, demoted, until, code in health:
        state = f"demoted until {until.isoformat(timespec='seconds')}" if demoted else f"{errors} recent error(s)"
        print(f"provider {state}: tenant {tenant} {channel} position {position} ({provider}), last error {code or '-'}")
    if not rows:
        print("queue empty: nothing due, scheduled, in flight or unknown")
        return
    header = ("tenant", "channel", "due", "oldest due", "scheduled", "sending", "leases past due", "unknown")
    table = [header] + [(r[0], r[1], str(r[2]), f"{r[4]:.1f}s", str(r[3]), str(r[5]), str(r[6]), str(r[7])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, as `dispatcher status` prints them."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: str | None) -> str:
    """An ISO timestamp from the database as 'YYYY-MM-DD HH:MM:SS.mmm' (its offset dropped: UTC in the dev stack)."""
    if not ts:
        return ""
    return ts.replace("T", " ")[:23]


def cmd_notifications_find(args: argparse.Namespace) -> None:
    filters: dict[str, str] = {
        k: v
        for k, v in {
            "recipient": args.recipient,
            "status": args.status,
            "channel": args.channel,
            "category": args.category,
            "template": args.template,
            "created_from": args.since,
            "created_to": args.until,
            "idempotency_key": args.idempotency_key,
        }.items()
        if v is not None
    }
    if args.metadata:
        name, sep, value = args.metadata.partition("=")
        if not sep or not name:
            raise SystemExit(f"--metadata must be KEY=VALUE, got {args.metadata!r}")
        filters |= {"metadata_key": name, "metadata_value": value}
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.find_notifications_v1(%s, %s, %s, %s)",
            (_tenant_id(conn, args.tenant), Jsonb(filters), args.cursor, args.limit),
        ).fetchone()
    page = row[0] if row else {"items": [], "next_cursor": None}
    if args.json:
        print(json.dumps(page, indent=2))
        return
    if not page["items"]:
        print("no notifications found" + (" here; more may be further back (--cursor below)" if page["next_cursor"] else ""))
    else:
        _table(
            ("created", "id", "recipient", "template", "deliveries"),
            [
                (
                    _when(n["created_at"]),
                    n["id"],
                    n.get("recipient") or f"{n.get('recipient_count', 0)} recipients",
                    n["template"],
                    ", ".join(f"{d['channel']}:{d['status']}" for d in n.get("deliveries", [])) or ", ".join(n["channels"]),
                )
                for n in page["items"]
            ],
        )
    if page["next_cursor"]:
        print(f"\nmore: --cursor {page['next_cursor']}")


def cmd_notifications_show(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        tenant = _tenant_id(conn, args.tenant)
        summary = conn.execute("select notify_api.get_notification_v2(%s, %s)", (tenant, args.id)).fetchone()[0]  # type: ignore[index]
        timeline = conn.execute(
            "select notify_api.get_notification_timeline_v1(%s, %s, %s)", (tenant, args.id, args.max_deliveries)
        ).fetchone()[0]  # type: ignore[index]
    if args.json:
        print(json.dumps({"notification": summary, "timeline": timeline["timeline"]}, indent=2))
        return
    who = summary.get("recipient") or f"{summary.get('recipient_count')} recipients"
    print(f"notification {summary['id']}  {summary['status']}")
    print(f"  created   {_when(summary['created_at'])}   template {summary['template']}   to {who}")
    for name in ("idempotency_key", "category", "send_at", "expires_at", "http_request_id"):
        if summary.get(name):
            print(f"  {name.replace('_', ' ')}  {summary[name]}")
    if summary.get("metadata"):
        print(f"  metadata  {json.dumps(summary['metadata'])}")
    print("  deliveries  " + ", ".join(f"{s['channel']} {s['status']} x{s['count']}" for s in summary["summary"]))
    print()
    rows = []
    for e in timeline["timeline"]:
        kind = e["kind"]
        if kind == "status":
            what = f"{e.get('from') or '-'} -> {e['to']}"
            detail = " ".join(x for x in (f"by {e['source']}", e.get("reason") or "") if x)
        elif kind == "attempt":
            what = f"attempt {e['attempt']}: {e.get('outcome') or 'in flight'}"
            detail = " ".join(
                x for x in (e.get("provider") or "", e.get("provider_message_id") or "", e.get("error_code") or "") if x
            )
        elif kind == "callback":
            what = f"callback #{e['seq']}: {e.get('outcome') or e.get('message_status')}"
            detail = str(e.get("status_code") or e.get("error") or "")
        elif kind == "webhook":
            what = f"report from {e['provider']}: {e.get('status') or '-'}"
            detail = e.get("outcome") or ""
        else:
            what, detail = f"provider: {e['flag']}", ""
        rows.append((_when(e["at"]), e["channel"], e["recipient"], what, detail))
    if rows:
        _table(("at", "channel", "recipient", "event", "detail"), rows)
    else:
        print("no events yet")


def _reasons(delivery: dict[str, Any]) -> str:
    parts = []
    for r in delivery.get("reasons") or []:
        text = r["reason"] + (f" ({r['at']})" if r.get("at") else "")
        if r["reason"] == "no_consent" and (delivery.get("consent") or {}).get("entry"):
            entry = delivery["consent"]["entry"]
            text += f" [consent #{entry['id']} {entry['status']} by {entry['source']} at {_when(entry['recorded_at'])}]"
        elif r["reason"] == "missing_variables":
            text += ": " + ", ".join(r.get("variables") or [])
        elif r.get("detail"):
            text += f": {r['detail']}"
        parts.append(text)
    return "; ".join(parts)


def cmd_notifications_preview(args: argparse.Namespace) -> None:
    """A submission body's dry run (notify_api.preview_notification_v1), rendered with the worker's renderer and limits."""
    from dispatcher.preview import render_preview
    from dispatcher.render_pool import RenderPool

    raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: the body is not JSON: {exc}") from None
    url = _url(args)
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = _tenant_id(conn, args.tenant)
        answer = conn.execute("select notify_api.preview_notification_v1(%s, %s)", (tenant, Jsonb(body))).fetchone()[0]  # type: ignore[index]
    pool = RenderPool(declared.Settings.from_env(database_url=url))

    async def rendered() -> dict[str, Any]:
        try:
            return await render_preview(answer, pool)
        finally:
            pool.close()

    answer = asyncio.run(rendered())
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    print(
        f"preview: the submission would be {answer['outcome']}"
        + (f" ({answer['refused']['type']}: {answer['refused']['detail']})" if answer.get("refused") else "")
    )
    rows = []
    for d in answer["deliveries"]:
        rows.append(
            (
                d["recipient"],
                d["channel"],
                "yes" if d["would_send"] else "no",
                d["status"],
                _when(d.get("due_at")),
                d["provider"]["name"]
                + ("" if d["provider"]["source"] == "channel_provider" else f" ({d['provider']['source']})"),
                _reasons(d),
            )
        )
    _table(("recipient", "channel", "sends", "status", "due", "provider", "why not"), rows)
    for d in answer["deliveries"][: args.max_rendered]:
        if d.get("rendered"):
            print(f"\n{d['recipient']} / {d['channel']} ({d['locale'].get('template_locale')}):")
            for name, value in d["rendered"].items():
                print(f"  {name}: {value}")


def cmd_deliveries_resolve(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.resolve_delivery_v1(%s, %s, %s, %s)",
            (_tenant_id(conn, args.tenant), args.id, Jsonb({"status": args.status, "note": args.note}), "cli"),
        ).fetchone()
    d = row[0] if row else {}
    print(f"delivery {d.get('id')} is now {d.get('status')} ({d.get('reason')})")


def cmd_recipients_export(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute("select notify_api.export_recipient_v1(%s, %s)", (_tenant_id(conn, args.tenant), args.ref)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_recipients_erase(args: argparse.Namespace) -> None:
    if not args.yes:
        raise SystemExit("erasure cannot be undone: add --yes to erase this recipient's personal data")
    with psycopg.connect(_url(args), autocommit=True) as conn:
        row = conn.execute(
            "select notify_api.erase_recipient_v1(%s, %s, %s)", (_tenant_id(conn, args.tenant), args.ref, "cli")
        ).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = declared.Settings.from_env()
    logs.configure(settings.log_level)
    from providers.base import ConfigurationError
    from providers.registry import webhook_adapters, webhooks_needing_public_url

    try:
        webhook_adapters(settings)  # a webhook secret that cannot work stops the API here, with one clear line
    except ConfigurationError as exc:
        raise SystemExit(f"dispatcher serve: configuration error: {exc}") from None
    if not settings.public_url and webhooks_needing_public_url():
        log.warning(
            "DISPATCHER_PUBLIC_URL is not set: webhooks %s cannot be verified (they answer 404)",
            ", ".join(webhooks_needing_public_url()),
        )
    uvicorn.run(
        "api.app:app_from_env",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


def cmd_worker(args: argparse.Namespace) -> None:
    # The process set-up (JSON logs, tracing, metrics listener, settings, closing the providers) is in
    # runner.app.WorkerApp.run_worker_async, so `procrastinate --app=runner.app.app worker` gets the same.
    from runner.app import app, prepare_process

    settings = prepare_process()

    async def main() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=args.concurrency or settings.worker_concurrency)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def _loop_factory() -> Any:
    """uvloop where installed (every platform but Windows), as uvicorn does for the API; asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _dev_file(data_dir: Path, name: str, make: callable) -> str:  # type: ignore[valid-type]
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def _say(message: str) -> None:
    """One line per step of the dev stack on its console (its processes log JSON lines of their own)."""
    print(f"dev: {message}", flush=True)


def ensure_app_login(owner_url: str, login: str = DEV_APP_LOGIN) -> None:
    """Creates the dev stack's application login: a notify_service member, not a superuser, not BYPASSRLS, owner of
    nothing (what deploy/postgres-init.sql creates in production). Local socket connections are trusted: no password."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (login,)).fetchone():
            try:
                conn.execute(
                    psycopg.sql.SQL("create role {} login nosuperuser nobypassrls in role notify_service").format(
                        psycopg.sql.Identifier(login)
                    )
                )
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                pass  # a concurrent start made it


class _Child:
    """A process of the dev stack, restarted (after a backoff) whenever it exits while the stack is not stopping."""

    MAX_BACKOFF = 30.0

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.restarts = 0
        self.backoff = 0.0
        self.restart_at: float | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()

    def check(self, now: float) -> None:
        if self.restart_at is None:
            code = self.proc.poll()
            if code is None:
                return
            ran = now - self.started
            # 1 s, doubling up to 30 s while it keeps failing (Postgres still away, a port in use); 1 s again once
            # it had run for 30 s.
            self.backoff = 1.0 if ran >= self.MAX_BACKOFF or not self.backoff else min(self.backoff * 2, self.MAX_BACKOFF)
            self.restart_at = now + self.backoff
            _say(f"{self.name} exited with code {code} after {ran:.0f}s; restarting it in {self.backoff:.0f}s")
        elif now >= self.restart_at:
            self.restart_at = None
            self.restarts += 1
            self.start()
            _say(f"{self.name} restarted (restart {self.restarts}, pid {self.proc.pid})")


def cmd_dev(args: argparse.Namespace) -> None:
    from providers.standard_webhooks import new_secret

    logs.configure(declared.read("log_level"))
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    stop_postgres = None
    if env.get("DATABASE_URL"):
        owner_url = app_url = env["DATABASE_URL"]
        _say("database: DATABASE_URL (migrations, API and worker all use it as it is)")
    else:
        from dispatcher.embedded import DEV_POSTGRES_MAJOR, EmbeddedPostgres, running_server

        warnings.filterwarnings("ignore", module="platformdirs")
        pgdata = data_dir / "pgdata"
        was = "reusing the running" if running_server(pgdata) else "started" if (pgdata / "PG_VERSION").exists() else "created"
        pg = EmbeddedPostgres(pgdata)
        _say(f"postgres: {was} embedded PostgreSQL {os.environ.get('PGSERVER_POSTGRES_VERSION', DEV_POSTGRES_MAJOR)} in {pgdata}")
        owner_url = pg.ensure_database(DEV_DATABASE)
        if was != "reusing the running":
            stop_postgres = pg.stop  # at the end, even if it was restarted behind pgserver's back meanwhile
    try:
        applied = schema.migrate(owner_url)
    except schema.MigrationRefused as exc:
        raise SystemExit(f"error: {exc}") from None
    _say(
        f"migrations: applied {len(applied)} ({applied[0]} … {applied[-1]})"
        if len(applied) > 1
        else f"migrations: applied {applied[0]}"
        if applied
        else "migrations: up to date"
    )
    if not env.get("DATABASE_URL"):
        ensure_app_login(owner_url)
        app_url = pg.url(DEV_DATABASE, DEV_APP_LOGIN)
        env["DATABASE_URL"] = app_url
        _say(
            f"database: {app_url}  (API, worker and CLI as {DEV_APP_LOGIN}, a notify_service login; "
            f"migrations and psql as {DEV_OWNER_LOGIN})"
        )

    key = declared.read("dev_api_key") or _dev_file(data_dir, "dev_api_key", keys.generate)
    with psycopg.connect(app_url, autocommit=True) as conn:
        row = conn.execute("select notify_api.get_tenant_v1('dev')").fetchone()
        tenant_id = (
            str(row[0]["id"])
            if row and row[0]
            else str(conn.execute("select notify_api.create_tenant_v1('dev', 'Development')").fetchone()[0]["id"])
        )  # type: ignore[index]
        if not conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone():
            create_key(conn, tenant_id, "dev", key)
    # The dev tenant may reference DEV_* variables and files in <data-dir>/secrets/, and reach local fakes and relays:
    # an operator's grant, so given as the owner (the app login may not).
    with psycopg.connect(owner_url, autocommit=True) as conn:
        (data_dir / "secrets").mkdir(mode=0o700, exist_ok=True)
        try:
            grant_provider_use(conn, tenant_id, "DEV_", f"{data_dir / 'secrets'}/", True)
        except psycopg.Error as exc:  # a data dir the namespace rules refuse (spaces, say): no file references
            if exc.sqlstate not in ("ND422", "ND409"):
                raise
            grant_provider_use(conn, tenant_id, "DEV_", "", True)
    _say(f"tenant: dev  API key: {key}  (kept in {data_dir / 'dev_api_key'})")
    env.setdefault("DISPATCHER_MOCK_WEBHOOK_SECRET", _dev_file(data_dir, "mock_webhook_secret", new_secret))
    env["DISPATCHER_PORT"] = str(args.port)
    env.setdefault("DISPATCHER_DEV_MODE", "1")  # status callbacks to a receiver on localhost are allowed
    env.setdefault("DISPATCHER_MOCK_WEBHOOK_URL", f"http://127.0.0.1:{args.port}/public/webhooks/mock")

    _say(
        f"starting the API on http://127.0.0.1:{args.port} (OpenAPI: /schema) and the worker with the mock provider; "
        "Ctrl-C stops all; in another shell: .venv/bin/dispatcher status"
    )
    children = [
        _Child("API", [sys.executable, "-m", "cli", "serve", "--port", str(args.port)], env),
        _Child("worker", [sys.executable, "-m", "cli", "worker"], env),
    ]

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for child in children:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, stop)
    try:
        while not stopping:
            for child in children:
                if not stopping:
                    child.check(time.monotonic())
            time.sleep(0.3)
        for child in children:
            try:
                child.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.proc.kill()
    finally:
        if stop_postgres is not None:
            stop_postgres()
        print("stopped", flush=True)


def parser() -> argparse.ArgumentParser:
    from providers.registry import CHANNELS, PROVIDERS  # the one list of each (the provider registration)

    p = argparse.ArgumentParser(
        prog="dispatcher",
        description="notification-dispatcher. Without DATABASE_URL, every "
        "command but serve and worker uses the running dev database of `dispatcher dev`.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    # The commands that talk to a database: where to find the dev database when DATABASE_URL is unset.
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument(
        "--data-dir",
        default=None,
        help="the dev stack's data folder, used when DATABASE_URL is unset (default: DISPATCHER_DATA_DIR or ./.dispatcher)",
    )

    dev = sub.add_parser("dev", help="run everything locally (embedded Postgres unless DATABASE_URL is set)")
    dev.add_argument("--port", type=int, default=declared.read("port"))
    dev.add_argument("--data-dir", default=declared.read("data_dir"))
    dev.set_defaults(func=cmd_dev)

    sub.add_parser("migrate", parents=[db], help="apply pending migrations (to DATABASE_URL or the dev database)").set_defaults(
        func=cmd_migrate
    )

    sub.add_parser(
        "psql",
        parents=[db],
        help="psql on the database as its owner; other arguments go to psql",
        description="Opens psql on DATABASE_URL, or on the running dev database as its superuser; "
        "every argument not listed here goes to psql, e.g. dispatcher psql -c 'select 1'.",
    ).set_defaults(func=cmd_psql)

    status = sub.add_parser(
        "status", parents=[db], help="queue health per tenant and channel: due, oldest due, scheduled, in flight, stuck, unknown"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=declared.read("api_workers"))
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the dispatch worker")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=cmd_worker)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(dest="action", required=True)
    tc = tenant.add_parser("create", parents=[db], help="create a tenant")
    tc.add_argument("slug")
    tc.add_argument("--name", default=None)
    tc.add_argument("--locale", default="en", help="default locale, last step of template fallback")
    tc.set_defaults(func=cmd_tenant_create)
    ts = tenant.add_parser(
        "secrets",
        parents=[db],
        help="what a tenant's provider settings may use: its secret namespace, private endpoints",
        description="Operator only (not reachable with an API key): the environment-variable prefix and the "
        "directory a tenant's secret references must lie in, and whether its WhatsApp base_url / "
        "SMTP host may be private hosts. Options left out keep their value; an empty value clears.",
    )
    ts.add_argument("--tenant", required=True)
    ts.add_argument("--env-prefix", default=None, metavar="PREFIX", help="e.g. NOTIFY_TENANT_ACME_ (must end with _)")
    ts.add_argument("--file-dir", default=None, metavar="DIR", help="e.g. /run/secrets/acme/ (absolute, ends with /)")
    private = ts.add_mutually_exclusive_group()
    private.add_argument(
        "--private-endpoints",
        dest="private_endpoints",
        action="store_true",
        default=None,
        help="allow http and private, loopback or single-label hosts (a local relay)",
    )
    private.add_argument("--public-endpoints-only", dest="private_endpoints", action="store_false")
    ts.set_defaults(func=cmd_tenant_secrets)

    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create", parents=[db], help="create a key and print it once")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", default="default")
    kc.add_argument(
        "--scope",
        action="append",
        choices=["submit", "read", "admin"],
        help="repeatable; default all three (submit: send and cancel; read: read; admin: configure)",
    )
    kc.add_argument(
        "--test",
        action="store_true",
        help="a test key: everything it submits is sent by the mock provider only (README, Test keys)",
    )
    kc.set_defaults(func=cmd_key_create)
    kro = key.add_parser("rotate", parents=[db], help="replace a key; the old one keeps working for the overlap window")
    kro.add_argument("--tenant", required=True)
    kro.add_argument("key_id")
    kro.add_argument("--overlap-seconds", type=int, default=86400)
    kro.set_defaults(func=cmd_key_rotate)
    kr = key.add_parser("revoke", parents=[db], help="revoke a key at once")
    kr.add_argument("--tenant", required=True)
    kr.add_argument("key_id")
    kr.set_defaults(func=cmd_key_revoke)
    kl = key.add_parser("list", parents=[db], help="list a tenant's keys (prefixes only)")
    kl.add_argument("--tenant", required=True)
    kl.set_defaults(func=cmd_key_list)

    provider = sub.add_parser("provider", help="configure channel providers").add_subparsers(dest="action", required=True)
    ps = provider.add_parser(
        "set",
        parents=[db],
        help="set the provider of a tenant's channel",
        description="Secrets are references, never values: --secret access_token=env:WA_TOKEN "
        "or --secret password=file:/run/secrets/smtp. Setting values are JSON when they parse.",
    )
    ps.add_argument("--tenant", required=True)
    ps.add_argument("--channel", required=True, choices=CHANNELS)
    ps.add_argument("--provider", required=True, choices=PROVIDERS)
    ps.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    ps.add_argument("--secret", action="append", default=[], metavar="NAME=env:VAR|file:/path")
    ps.set_defaults(func=cmd_provider_set)
    pc = provider.add_parser(
        "chain",
        parents=[db],
        help="replace the failover chain of a tenant's channel (the primary first)",
        description="PROVIDERS is a JSON array of {provider, settings, secrets} as `provider set` takes them, or @file. "
        "A send known not to have been accepted moves to the next one at once; an ambiguous outcome never does on "
        "WhatsApp or SMS.",
    )
    pc.add_argument("--tenant", required=True)
    pc.add_argument("--channel", required=True, choices=CHANNELS)
    pc.add_argument("providers", metavar="PROVIDERS")
    pc.set_defaults(func=cmd_provider_chain)
    pl = provider.add_parser("list", parents=[db], help="the provider of each channel (secret references, never values)")
    pl.add_argument("--tenant", required=True)
    pl.set_defaults(func=cmd_provider_list)

    retention = sub.add_parser(
        "retention",
        help="how long personal data and history are kept (docs/operations.md, Retention)",
    ).add_subparsers(dest="action", required=True)
    rs = retention.add_parser("show", parents=[db], help="a tenant's retention periods, per channel")
    rs.add_argument("--tenant", required=True)
    rs.set_defaults(func=cmd_retention_show)
    rset = retention.add_parser(
        "set",
        parents=[db],
        help="set a tenant's retention periods (replaces them; what is left out takes the default)",
        description="Days, 1 to 3650; history at least content. --channel-content whatsapp=7 --channel-history sms=60.",
    )
    rset.add_argument("--tenant", required=True)
    rset.add_argument("--content-days", type=int, default=None, help="personal data and content")
    rset.add_argument("--history-days", type=int, default=None, help="content-free history (statuses, timestamps, attempts)")
    rset.add_argument("--channel-content", action="append", default=[], metavar="CHANNEL=DAYS")
    rset.add_argument("--channel-history", action="append", default=[], metavar="CHANNEL=DAYS")
    rset.set_defaults(func=cmd_retention_set)
    rr = retention.add_parser("run", parents=[db], help="run the worker's retention task once, now")
    rr.set_defaults(func=cmd_retention_run)

    quiet = sub.add_parser(
        "quiet-hours",
        help="when a tenant's deliveries are held: quiet hours in the recipient's time zone (README, Quiet hours)",
    ).add_subparsers(dest="action", required=True)
    qs = quiet.add_parser("show", parents=[db], help="a tenant's quiet hours and default time zone")
    qs.add_argument("--tenant", required=True)
    qs.set_defaults(func=cmd_quiet_hours_show)
    qset = quiet.add_parser(
        "set",
        parents=[db],
        help="set a tenant's quiet hours (replaces them; what is left out is not set)",
        description="Local times HH:MM; a window whose start is after its end crosses midnight. "
        "--start 21:00 --end 08:00 --timezone Europe/Madrid --category reminder=20:00-09:00 --exempt password_reset.",
    )
    qset.add_argument("--tenant", required=True)
    qset.add_argument("--timezone", default=None, help="for recipients without one (default UTC)")
    qset.add_argument("--start", default=None, metavar="HH:MM", help="the default window's start")
    qset.add_argument("--end", default=None, metavar="HH:MM", help="the default window's end")
    qset.add_argument("--category", action="append", default=[], metavar="NAME=HH:MM-HH:MM", help="a category's own window")
    qset.add_argument("--exempt", action="append", default=[], metavar="NAME", help="a category sent at once")
    qset.set_defaults(func=cmd_quiet_hours_set)
    qd = quiet.add_parser("delete", parents=[db], help="remove a tenant's quiet hours and default time zone")
    qd.add_argument("--tenant", required=True)
    qd.set_defaults(func=cmd_quiet_hours_delete)

    caps = sub.add_parser(
        "caps",
        help="how many messages a recipient may get: frequency caps (README, Frequency caps)",
    ).add_subparsers(dest="action", required=True)
    cs = caps.add_parser("show", parents=[db], help="a tenant's frequency caps")
    cs.add_argument("--tenant", required=True)
    cs.set_defaults(func=cmd_caps_show)
    cset = caps.add_parser(
        "set",
        parents=[db],
        help="set a tenant's frequency caps (replaces them; none given removes them)",
        description="--cap max=3,period=P1D,category=reminder --cap max=1,period=PT10M,channel=whatsapp,action=hold. "
        "period: ISO 8601, PT1S to P31D; action: suppress (default) or hold until the cap frees.",
    )
    cset.add_argument("--tenant", required=True)
    cset.add_argument("--cap", action="append", default=[], metavar="max=N,period=P1D[,channel=..][,category=..][,action=..]")
    cset.set_defaults(func=cmd_caps_set)
    cd = caps.add_parser("delete", parents=[db], help="remove a tenant's frequency caps")
    cd.add_argument("--tenant", required=True)
    cd.set_defaults(func=cmd_caps_delete)

    login = sub.add_parser(
        "login",
        help="bind database logins to the tenants they serve (run as the migrating role)",
        description="A bound login enters only its tenants (ND403 tenant_not_allowed otherwise); "
        "a login with no binding enters any tenant (docs/security.md, Tenant-bound logins).",
    )
    login_sub = login.add_subparsers(dest="action", required=True)
    lb = login_sub.add_parser("bind", parents=[db], help="bind a login to one more tenant")
    lb.add_argument("--login", required=True, help="the database role the client logs in as")
    lb.add_argument("--tenant", required=True, help="tenant slug")
    lb.set_defaults(func=cmd_login_bind)
    lu = login_sub.add_parser(
        "unbind", parents=[db], help="remove one tenant from a login's binding (the last one: unrestricted again)"
    )
    lu.add_argument("--login", required=True)
    lu.add_argument("--tenant", required=True)
    lu.set_defaults(func=cmd_login_unbind)
    ll = login_sub.add_parser("list", parents=[db], help="the bound logins and their tenants")
    ll.add_argument("--login", default=None)
    ll.set_defaults(func=cmd_login_list)

    notifications = sub.add_parser("notifications", help="find notifications and show their history (support)")
    notifications_sub = notifications.add_subparsers(dest="action", required=True)
    nf = notifications_sub.add_parser("find", parents=[db], help="a tenant's notifications, newest first, by filters")
    nf.add_argument("--tenant", required=True)
    nf.add_argument("--recipient", help="the recipient's ref")
    nf.add_argument("--status", help="a delivery's status, e.g. failed or unknown")
    nf.add_argument("--channel", choices=CHANNELS)
    nf.add_argument("--category")
    nf.add_argument("--template")
    nf.add_argument("--since", help="created at or after (ISO 8601)")
    nf.add_argument("--until", help="created before (ISO 8601)")
    nf.add_argument("--idempotency-key")
    nf.add_argument("--metadata", help="KEY=VALUE of the request's metadata")
    nf.add_argument("--limit", type=int, default=20)
    nf.add_argument("--cursor", help="the previous page's cursor")
    nf.add_argument("--json", action="store_true")
    nf.set_defaults(func=cmd_notifications_find)
    ns = notifications_sub.add_parser("show", parents=[db], help="a notification with its timeline")
    ns.add_argument("--tenant", required=True)
    ns.add_argument("id")
    ns.add_argument("--max-deliveries", type=int, default=20, help="of a fan-out, how many deliveries' history to show")
    ns.add_argument("--json", action="store_true")
    ns.set_defaults(func=cmd_notifications_show)
    npv = notifications_sub.add_parser(
        "preview", parents=[db], help="dry run of a submission body: what it would send, when, through what, or why not"
    )
    npv.add_argument("--tenant", required=True)
    npv.add_argument("file", help="the POST /internal/notifications body as a JSON file, or - for stdin")
    npv.add_argument("--max-rendered", type=int, default=10, help="how many deliveries' rendered content to print")
    npv.add_argument("--json", action="store_true")
    npv.set_defaults(func=cmd_notifications_preview)

    deliveries = sub.add_parser("deliveries", help="one delivery").add_subparsers(dest="action", required=True)
    dr = deliveries.add_parser("resolve", parents=[db], help="end an unknown outcome by hand (to sent or failed, with a note)")
    dr.add_argument("--tenant", required=True)
    dr.add_argument("id")
    dr.add_argument("--status", required=True, choices=["sent", "failed"])
    dr.add_argument("--note", required=True, help="what you learned, e.g. from the provider's console")
    dr.set_defaults(func=cmd_deliveries_resolve)

    recipients = sub.add_parser("recipients", help="a recipient's personal data").add_subparsers(dest="action", required=True)
    rx = recipients.add_parser("export", parents=[db], help="everything held about a recipient, as JSON (access request)")
    rx.add_argument("--tenant", required=True)
    rx.add_argument("ref")
    rx.set_defaults(func=cmd_recipients_export)
    re_ = recipients.add_parser("erase", parents=[db], help="erase a recipient's personal data (cannot be undone)")
    re_.add_argument("--tenant", required=True)
    re_.add_argument("ref")
    re_.add_argument("--yes", action="store_true", help="confirm")
    re_.set_defaults(func=cmd_recipients_erase)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.func is cmd_psql:
        args.psql_args = extra  # everything we do not know goes to psql: dispatcher psql -c 'select 1'
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except schema.MigrationRefused as exc:
        raise SystemExit(f"error: {exc}") from None
    except psycopg.Error as exc:
        raise SystemExit(f"error: {' '.join(str(exc.diag.message_primary or exc).split())}") from None


if __name__ == "__main__":
    main()
