"""The `dispatcher` command: dev, migrate, serve, worker, tenant, key.

    dispatcher dev [--port N]          embedded Postgres (if DATABASE_URL is unset) + migrate + dev tenant/key + API + worker
    dispatcher migrate                 apply pending migrations to DATABASE_URL
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
    dispatcher provider list --tenant S
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

log = logging.getLogger("dispatcher")


def _url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    return url


def _tenant_id(conn: psycopg.Connection, slug: str) -> str:
    row = conn.execute("select notify_api.get_tenant_v1(%s)", (slug,)).fetchone()
    if not row or row[0] is None:
        raise SystemExit(f"no tenant {slug!r} (create it with: dispatcher tenant create {slug})")
    return str(row[0]["id"])


def cmd_migrate(args: argparse.Namespace) -> None:
    applied = schema.migrate(_url())
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "database is up to date")


def cmd_tenant_create(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute("select notify_api.create_tenant_v1(%s, %s, %s)", (args.slug, args.name, args.locale)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def grant_provider_use(conn: psycopg.Connection, tenant_id: str, env_prefix: str | None, file_dir: str | None,
                       private_endpoints: bool | None) -> dict:
    """Changes what the operator lets a tenant's providers use; None keeps the current value, "" clears a namespace."""
    current = conn.execute("select notify_api.get_provider_grants_v1(%s)", (tenant_id,)).fetchone()[0]  # type: ignore[index]
    row = conn.execute("select notify_api.set_provider_grants_v1(%s, %s, %s, %s)", (
        tenant_id, current["env_prefix"] if env_prefix is None else env_prefix or None,
        current["file_dir"] if file_dir is None else file_dir or None,
        current["private_endpoints"] if private_endpoints is None else private_endpoints)).fetchone()
    assert row is not None
    return row[0]


def cmd_tenant_secrets(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        out = grant_provider_use(conn, _tenant_id(conn, args.tenant), args.env_prefix, args.file_dir, args.private_endpoints)
    print(json.dumps(out, indent=2))


def create_key(conn: psycopg.Connection, tenant_id: str, name: str, key: str | None = None,
               scopes: list[str] | None = None) -> tuple[str, dict]:
    key = key or keys.generate()
    row = conn.execute("select notify_api.create_api_key_v1(%s, %s, %s, %s, %s)",
                       (tenant_id, name, keys.display_prefix(key), keys.digest(key), scopes or ["submit", "read", "admin"])).fetchone()
    assert row is not None
    return key, row[0]


def cmd_key_create(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        key, info = create_key(conn, _tenant_id(conn, args.tenant), args.name, scopes=args.scope or None)
    print(f"API key for tenant {args.tenant} (id {info['id']}, scopes {', '.join(info['scopes'])}); shown once, store it now:\n{key}")


def cmd_key_rotate(args: argparse.Namespace) -> None:
    key = keys.generate()
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute("select notify_api.rotate_api_key_v1(%s, %s, %s, %s, %s)",
                           (_tenant_id(conn, args.tenant), args.key_id, keys.display_prefix(key), keys.digest(key), args.overlap_seconds)).fetchone()
    info = row[0] if row else {}
    print(f"new API key (id {info.get('id')}) replaces {args.key_id}, which works until {info.get('old_key_expires_at')}; "
          f"shown once, store it now:\n{key}")


def cmd_key_revoke(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute("select notify_api.revoke_api_key_v1(%s, %s)", (_tenant_id(conn, args.tenant), args.key_id)).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_key_list(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
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
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute("select notify_api.set_channel_provider_v1(%s, %s::notify.channel, %s)",
                           (_tenant_id(conn, args.tenant), args.channel, Jsonb(body))).fetchone()
    print(json.dumps(row[0] if row else None, indent=2))


def cmd_provider_list(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute("select notify_api.list_channel_providers_v1(%s)", (_tenant_id(conn, args.tenant),)).fetchone()
    print(json.dumps(row[0] if row else [], indent=2))


def cmd_status(args: argparse.Namespace) -> None:
    with psycopg.connect(_url(), autocommit=True) as conn:
        rows = conn.execute("select * from notify_api.queue_health_v1()").fetchall()
    if args.json:
        cols = ["tenant", "channel", "due", "scheduled", "oldest_due_seconds", "sending", "leases_past_due", "unknown"]
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], indent=2, default=str))
        return
    if not rows:
        print("queue empty: nothing due, scheduled, in flight or unknown")
        return
    header = ("tenant", "channel", "due", "oldest due", "scheduled", "sending", "leases past due", "unknown")
    table = [header] + [(r[0], r[1], str(r[2]), f"{r[4]:.1f}s", str(r[3]), str(r[5]), str(r[6]), str(r[7])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from dispatcher.settings import Settings

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    uvicorn.run("api.app:app_from_env", factory=True, host=args.host or settings.host, port=args.port or settings.port,
                workers=args.workers, log_config=None, access_log=False, timeout_graceful_shutdown=20)


def cmd_worker(args: argparse.Namespace) -> None:
    from dispatcher.settings import Settings
    from runner.app import app
    from runner.tasks import _dispatchers, _senders

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    from dispatcher import tracing

    tracing.setup("dispatcher-worker")
    metrics_port = os.environ.get("DISPATCHER_WORKER_METRICS_PORT")
    if metrics_port:
        from prometheus_client import start_http_server

        from dispatcher import metrics

        metrics.register_queue_health(settings.database_url)
        start_http_server(int(metrics_port), addr=os.environ.get("DISPATCHER_WORKER_METRICS_HOST", "127.0.0.1"))

    async def main() -> None:
        async with app.open_async():
            try:
                await app.run_worker_async(additional_context={"settings": settings},
                                           concurrency=args.concurrency or settings.worker_concurrency)
            finally:
                # Pending mock status reports get a few seconds; a supervisor must see the exit promptly.
                for d in [*_dispatchers.values(), *_senders.values()]:
                    try:
                        await asyncio.wait_for(d.aclose(), timeout=10)
                    except (TimeoutError, Exception):  # noqa: BLE001
                        log.warning("provider did not close in time")

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


def cmd_dev(args: argparse.Namespace) -> None:
    from providers.standard_webhooks import new_secret

    logs.configure(os.environ.get("DISPATCHER_LOG_LEVEL", "INFO"))
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not env.get("DATABASE_URL"):
        from dispatcher.embedded import EmbeddedPostgres

        warnings.filterwarnings("ignore", module="platformdirs")
        print(f"starting embedded PostgreSQL in {data_dir / 'pgdata'} ...", flush=True)
        pg = EmbeddedPostgres(data_dir / "pgdata")
        env["DATABASE_URL"] = pg.ensure_database("dispatcher")
    os.environ["DATABASE_URL"] = env["DATABASE_URL"]
    applied = schema.migrate(env["DATABASE_URL"])
    print(f"migrations: {', '.join(applied) or 'up to date'}", flush=True)

    key = env.get("DISPATCHER_DEV_API_KEY") or _dev_file(data_dir, "dev_api_key", keys.generate)
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("select notify_api.get_tenant_v1('dev')").fetchone()
        tenant_id = str(row[0]["id"]) if row and row[0] else str(
            conn.execute("select notify_api.create_tenant_v1('dev', 'Development')").fetchone()[0]["id"])  # type: ignore[index]
        if not conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone():
            create_key(conn, tenant_id, "dev", key)
        # The dev tenant may reference DEV_* variables and files in <data-dir>/secrets/, and reach local fakes and relays.
        (data_dir / "secrets").mkdir(mode=0o700, exist_ok=True)
        try:
            grant_provider_use(conn, tenant_id, "DEV_", f"{data_dir / 'secrets'}/", True)
        except psycopg.Error as exc:  # a data dir the namespace rules refuse (spaces, say): no file references
            if exc.sqlstate not in ("ND422", "ND409"):
                raise
            grant_provider_use(conn, tenant_id, "DEV_", "", True)
    env.setdefault("DISPATCHER_MOCK_WEBHOOK_SECRET", _dev_file(data_dir, "mock_webhook_secret", new_secret))
    env["DISPATCHER_PORT"] = str(args.port)
    env.setdefault("DISPATCHER_DEV_MODE", "1")  # status callbacks to a receiver on localhost are allowed
    env.setdefault("DISPATCHER_MOCK_WEBHOOK_URL", f"http://127.0.0.1:{args.port}/public/webhooks/mock")

    print(f"\nnotification-dispatcher is starting on http://127.0.0.1:{args.port}  (OpenAPI: /schema, Ctrl-C stops)\n"
          f"  tenant: dev\n  API key: {key}\n"
          f"  try: export KEY={key}\n", flush=True)
    children = [
        subprocess.Popen([sys.executable, "-m", "dispatcher", "serve", "--port", str(args.port)], env=env),
        subprocess.Popen([sys.executable, "-m", "dispatcher", "worker"], env=env),
    ]

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.3)
        stop(signal.SIGTERM, None)
        for child in children:
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()
    finally:
        print("stopped", flush=True)
    codes = [c.returncode for c in children]
    if any(code not in (0, -signal.SIGTERM, None) for code in codes) and not stopping:
        raise SystemExit(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatcher", description="notification-dispatcher")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run everything locally (embedded Postgres unless DATABASE_URL is set)")
    dev.add_argument("--port", type=int, default=int(os.environ.get("DISPATCHER_PORT", "8000")))
    dev.add_argument("--data-dir", default=os.environ.get("DISPATCHER_DATA_DIR", ".dispatcher"))
    dev.set_defaults(func=cmd_dev)

    sub.add_parser("migrate", help="apply pending migrations to DATABASE_URL").set_defaults(func=cmd_migrate)

    status = sub.add_parser("status", help="queue health per tenant and channel: due, oldest due, scheduled, in flight, stuck, unknown")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=int(os.environ.get("DISPATCHER_API_WORKERS", "1")))
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the dispatch worker")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=cmd_worker)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(dest="action", required=True)
    tc = tenant.add_parser("create", help="create a tenant")
    tc.add_argument("slug")
    tc.add_argument("--name", default=None)
    tc.add_argument("--locale", default="en", help="default locale, last step of template fallback")
    tc.set_defaults(func=cmd_tenant_create)
    ts = tenant.add_parser("secrets", help="what a tenant's provider settings may use: its secret namespace, private endpoints",
                           description="Operator only (not reachable with an API key): the environment-variable prefix and the "
                                       "directory a tenant's secret references must lie in, and whether its WhatsApp base_url / "
                                       "SMTP host may be private hosts. Options left out keep their value; an empty value clears.")
    ts.add_argument("--tenant", required=True)
    ts.add_argument("--env-prefix", default=None, metavar="PREFIX", help="e.g. NOTIFY_TENANT_ACME_ (must end with _)")
    ts.add_argument("--file-dir", default=None, metavar="DIR", help="e.g. /run/secrets/acme/ (absolute, ends with /)")
    private = ts.add_mutually_exclusive_group()
    private.add_argument("--private-endpoints", dest="private_endpoints", action="store_true", default=None,
                         help="allow http and private, loopback or single-label hosts (a local relay)")
    private.add_argument("--public-endpoints-only", dest="private_endpoints", action="store_false")
    ts.set_defaults(func=cmd_tenant_secrets)

    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create", help="create a key and print it once")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", default="default")
    kc.add_argument("--scope", action="append", choices=["submit", "read", "admin"],
                    help="repeatable; default all three (submit: send and cancel; read: read; admin: configure)")
    kc.set_defaults(func=cmd_key_create)
    kro = key.add_parser("rotate", help="replace a key; the old one keeps working for the overlap window")
    kro.add_argument("--tenant", required=True)
    kro.add_argument("key_id")
    kro.add_argument("--overlap-seconds", type=int, default=86400)
    kro.set_defaults(func=cmd_key_rotate)
    kr = key.add_parser("revoke", help="revoke a key at once")
    kr.add_argument("--tenant", required=True)
    kr.add_argument("key_id")
    kr.set_defaults(func=cmd_key_revoke)
    kl = key.add_parser("list", help="list a tenant's keys (prefixes only)")
    kl.add_argument("--tenant", required=True)
    kl.set_defaults(func=cmd_key_list)

    provider = sub.add_parser("provider", help="configure channel providers").add_subparsers(dest="action", required=True)
    ps = provider.add_parser("set", help="set the provider of a tenant's channel",
                             description="Secrets are references, never values: --secret access_token=env:WA_TOKEN "
                                         "or --secret password=file:/run/secrets/smtp. Setting values are JSON when they parse.")
    ps.add_argument("--tenant", required=True)
    ps.add_argument("--channel", required=True, choices=["whatsapp", "email", "sms"])
    ps.add_argument("--provider", required=True, choices=["mock", "whatsapp_cloud", "smtp"])
    ps.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    ps.add_argument("--secret", action="append", default=[], metavar="NAME=env:VAR|file:/path")
    ps.set_defaults(func=cmd_provider_set)
    pl = provider.add_parser("list", help="the provider of each channel (secret references, never values)")
    pl.add_argument("--tenant", required=True)
    pl.set_defaults(func=cmd_provider_list)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except psycopg.Error as exc:
        raise SystemExit(f"error: {exc.diag.message_primary or exc}") from None


if __name__ == "__main__":
    main()
