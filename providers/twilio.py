"""SMS through Twilio Programmable Messaging: sending, what a message costs, and Twilio's webhooks.

Sending: POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json, form-encoded, basic auth with the account SID
and auth token (or an API key SID and secret), From a number or a MessagingServiceSid. Our correlation id travels as a
parameter of the StatusCallback URL ({DISPATCHER_PUBLIC_URL}/public/webhooks/twilio?nd=tenant:delivery); the returned
SM... sid is the provider message id. Errors are classified by Twilio's error code (provider-protocols.md §3.1, §5.4): an
unsubscribed recipient (21610) is suppressed and its SMS consent revoked (trigger _410_revoke_sms_consent), throttling is
retried after Retry-After, other refusals fail; a request that may have left us without an answer is `unknown`, never
resent (the Messages API has no idempotency key).

What it costs: `sms_parts` counts the text as sent (GSM-7 or UCS-2, segments); the delivery keeps it (its `pricing`).
The database counts a template's fixed text with the same rules at save time (notify._sms_parts).

Webhooks (POST /public/webhooks/twilio): status callbacks and inbound messages, form-encoded, signed with
X-Twilio-Signature = base64(HMAC-SHA1(auth token, URL + each POST parameter's name and value, sorted by name)) over the
URL Twilio requested. That URL is rebuilt from the configured public URL (DISPATCHER_PUBLIC_URL), never from the Host
header, so a reverse proxy in front changes nothing. Each tenant has its own Twilio account and auth token: the adapter
asks the database whose key to try (notify_api.webhook_keys_v1, from the unverified AccountSid and the tenant in the URL
or the number written to, or the Messaging Service whose pool that number belongs to) and verifies with that tenant's
token only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import httpx

from dispatcher.callback_urls import UnsafeUrl
from providers.base import (
    InboundMessage,
    Message,
    ParsedWebhook,
    ProviderContext,
    ProviderKind,
    SendResult,
    StatusEvent,
    Webhook,
    WebhookRejected,
    WebhookRequest,
    parse_correlation_id,
    text,
    webhook_url,
)
from providers.secrets import Endpoint, Grants, SecretMissing, endpoint, resolve

NAME = "twilio"
ROUTE = "twilio"  # POST /public/webhooks/twilio
log = logging.getLogger("providers.twilio")

# --- what a message costs -------------------------------------------------------------------------------------------
# GSM 03.38 default alphabet (one septet each; ESC is not a character) and its extension table (escape + one: two).
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = frozenset("\f^{}\\[~]|€")


def sms_parts(body: str) -> dict[str, Any]:
    """{encoding: GSM-7|UCS-2, segments, units}: 160 septets (70 UTF-16 units) in one segment, 153 (67) per segment when
    concatenated; an extension character costs two septets, a character beyond the BMP two units, and neither pair is
    split across segments. The same rules as notify._sms_parts (sql/015_pure_helpers.sql)."""
    if not body:
        return {"encoding": "GSM-7", "segments": 0, "units": 0}
    gsm = all(c in GSM_BASIC or c in GSM_EXTENSION for c in body)
    if gsm:
        costs = [2 if c in GSM_EXTENSION else 1 for c in body]
        single, multi = 160, 153
    else:
        costs = [2 if ord(c) > 0xFFFF else 1 for c in body]
        single, multi = 70, 67
    units = sum(costs)
    segments = 1
    if units > single:
        used = 0
        for cost in costs:
            if used + cost > multi:
                segments += 1
                used = 0
            used += cost
    return {"encoding": "GSM-7" if gsm else "UCS-2", "segments": segments, "units": units}


# --- errors ---------------------------------------------------------------------------------------------------------
# Twilio's error codes by what we do about them (https://www.twilio.com/docs/api/errors; provider-protocols.md §3.1).
UNSUBSCRIBED = {21610}  # the recipient replied STOP to this sender
THROTTLED = {20429, 14107}  # too many requests / SMS send rate limit exceeded
# The account, the credentials or the sender: nothing is wrong with the message; kept and retried while an operator
# fixes it (authenticate 20003, account suspended 20005, resource not found 20404 (a wrong account SID), From not a
# number of the account or not SMS-capable 21606 / 21659 / 21660, Messaging Service without numbers 21703 / 21704).
CONFIGURATION = {20003, 20005, 20404, 21606, 21659, 21660, 21703, 21704}
# What the reports' ErrorCode names (the carrier's answer), for the stored message.
DESCRIPTIONS = {
    21211: "Invalid 'To' phone number",
    21408: "Permission to send an SMS has not been enabled for the region",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number is not currently reachable",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit",
    30001: "Queue overflow",
    30002: "Account suspended",
    30003: "Unreachable destination handset",
    30004: "Message blocked",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered by the carrier",
    30008: "Unknown error",
}
RETRY_AFTER_DEFAULT = 1.0
CONFIGURATION_RETRY_SECONDS = 300.0


def _retry_after(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return min(max(seconds, 0.0), 3600.0) if seconds == seconds else default  # NaN: the default


def classify(code: int | None, message: str, http_status: int, retry_after: str | None = None) -> SendResult:
    """A Messages API error answer (HTTP status, Twilio's `code` and `message`) as an attempt outcome."""
    error_code = f"twilio_{code}" if code is not None else f"http_{http_status}"
    message = message[:1000]
    if code in UNSUBSCRIBED:
        return SendResult(outcome="suppressed", provider=NAME, error_code=error_code, error_message=message)
    if code in THROTTLED or http_status == 429:
        return SendResult(
            outcome="retry",
            provider=NAME,
            error_code=error_code,
            error_message=message,
            retry_after_seconds=_retry_after(retry_after, RETRY_AFTER_DEFAULT if code != 14107 else 5.0),
            not_sent=True,  # refused as too many: no message was created
        )
    if code in CONFIGURATION or http_status in (401, 403):
        log.error("twilio account or credentials need an operator", extra={"error_code": error_code})
        return SendResult(
            outcome="retry",
            provider=NAME,
            error_code=error_code,
            error_message=message,
            retry_after_seconds=CONFIGURATION_RETRY_SECONDS,
            not_sent=True,  # credentials or account refused: no message was created
        )
    if http_status == 503:
        # Service unavailable: Twilio refused the request before creating a message (safe to send again).
        return SendResult(
            outcome="retry",
            provider=NAME,
            error_code=error_code,
            error_message=message or "service unavailable",
            retry_after_seconds=_retry_after(retry_after, 5.0),
            not_sent=True,
        )
    if http_status >= 500:
        # Any other server error: the message may have been created; no blind resend.
        return SendResult(outcome="unknown", provider=NAME, error_code=error_code, error_message=message or "server error")
    return SendResult(outcome="failed", provider=NAME, error_code=error_code, error_message=message)


# --- sending --------------------------------------------------------------------------------------------------------
def callback_url(public_url: str, correlation_id: str | None = None) -> str:
    """The StatusCallback we give Twilio, and so the URL Twilio signs: the public base URL, our webhook path, and our
    correlation id as its one query parameter."""
    return webhook_url(public_url, ROUTE, urlencode({"nd": correlation_id}) if correlation_id else "")


def request_form(message: Message, settings: dict[str, Any], public_url: str) -> dict[str, str]:
    form = {"To": message.address, "Body": str(message.rendered.get("text") or "")}
    if settings.get("messaging_service_sid"):
        form["MessagingServiceSid"] = str(settings["messaging_service_sid"])
    else:
        form["From"] = str(settings["from_number"])
    form["StatusCallback"] = callback_url(public_url, message.correlation_id)
    if settings.get("validity_period"):
        form["ValidityPeriod"] = str(int(settings["validity_period"]))
    return form


class Twilio:
    """One tenant's Twilio account and sender (a number or a Messaging Service)."""

    name = NAME

    def __init__(
        self, settings: dict[str, Any], secrets: dict[str, str], ctx: ProviderContext, grants: Grants | None = None
    ) -> None:
        self._settings = settings
        self._ctx = ctx
        self._grants = grants or Grants()
        self._account = str(settings["account_sid"])
        # Basic auth: an API key (SID and secret) when one is configured, else the account SID and auth token.
        self._user = str(settings.get("api_key_sid") or self._account)
        self._password_ref = secrets.get("api_key_secret") if settings.get("api_key_sid") else secrets.get("auth_token")
        self._sender = str(settings.get("messaging_service_sid") or settings.get("from_number") or "")
        self._rate = min(1000.0, float(settings.get("rate_per_second") or 10))
        base = str(settings.get("base_url") or "https://api.twilio.com").rstrip("/")
        self._url = f"{base}/2010-04-01/Accounts/{self._account}/Messages.json"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(float(settings.get("timeout_seconds") or 15), connect=5.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def _paced(self, count: int) -> None:
        """Waits until `count` sends fit in this sender's shared budget (every worker process draws from it)."""
        while count > 0:
            granted = await self._ctx.take_tokens(f"twilio:{self._account}:{self._sender}", self._rate, count)
            count -= granted
            if count > 0:
                await asyncio.sleep(min(1.0, max(0.01, min(count, self._rate) / self._rate)))

    async def _target(self) -> tuple[str, dict[str, str], dict[str, Any] | None]:
        """The URL to post to, pinned to the address that passed the endpoint check (no DNS rebinding in between)."""
        scheme, address, port = await endpoint(self._url, self._grants)
        parts = urlsplit(self._url)
        literal = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((scheme, f"{literal}:{port}", parts.path, parts.query, ""))
        return pinned, {"host": parts.netloc}, {"sni_hostname": parts.hostname} if scheme == "https" else None

    async def _one(
        self, message: Message, auth: httpx.BasicAuth, target: tuple[str, dict[str, str], dict[str, Any] | None], public_url: str
    ) -> SendResult:
        url, headers, extensions = target
        form = request_form(message, self._settings, public_url)
        parts = sms_parts(form["Body"])
        try:
            response = await self._client.post(url, data=form, headers=headers, auth=auth, extensions=extensions)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never left us: safe to retry.
            return SendResult(
                outcome="retry", provider=NAME, error_code="connect_failed", error_message=type(exc).__name__, not_sent=True
            )
        except httpx.HTTPError as exc:
            # The request may have reached Twilio (a read timeout, a reset after it was written): never resent blindly.
            return SendResult(outcome="unknown", provider=NAME, error_code="no_response", error_message=type(exc).__name__)
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        if response.status_code < 300:
            sid = text(payload.get("sid"), 64)
            if not sid:
                return SendResult(
                    outcome="unknown", provider=NAME, error_code="unexpected_response", error_message="2xx without a message sid"
                )
            if str(payload.get("num_segments") or "").isdigit():
                parts["twilio_segments"] = int(payload["num_segments"])
            if payload.get("status") == "failed" and payload.get("error_code"):
                code = int(payload["error_code"]) if str(payload["error_code"]).isdigit() else None
                result = classify(code, str(payload.get("error_message") or DESCRIPTIONS.get(code or 0, "failed")), 400)
                # A message was created (it has a sid): whatever the error, never "not sent".
                return SendResult(**{**_fields(result), "provider_message_id": sid, "pricing": parts, "not_sent": False})
            return SendResult(outcome="sent", provider=NAME, provider_message_id=sid, pricing=parts)
        code = payload.get("code")
        code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
        return classify(
            code, str(payload.get("message") or response.reason_phrase), response.status_code, response.headers.get("retry-after")
        )

    async def send_many(self, messages: list[Message]) -> list[SendResult]:
        public_url = self._ctx.settings.public_url
        if not public_url:
            # Without it Twilio cannot report back, and nothing it posts could be verified: an operator fixes the setting.
            log.error("twilio needs DISPATCHER_PUBLIC_URL for its status callbacks")
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code="public_url_missing",
                    error_message="DISPATCHER_PUBLIC_URL is not set: Twilio's status callbacks need it",
                    retry_after_seconds=CONFIGURATION_RETRY_SECONDS,
                )
                for _ in messages
            ]
        # The endpoint first, then the secret: a secret is never read for, let alone sent to, a host that fails the check.
        try:
            target = await self._target()
        except UnsafeUrl as exc:
            log.error("twilio endpoint refused", extra={"account_sid": self._account, "reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code="unsafe_endpoint",
                    error_message=str(exc),
                    retry_after_seconds=CONFIGURATION_RETRY_SECONDS,
                    not_sent=True,
                )
                for _ in messages
            ]
        try:
            password = resolve(self._password_ref, self._grants) or ""
        except SecretMissing as exc:
            log.error("twilio credentials unavailable", extra={"account_sid": self._account, "reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code=exc.code,
                    error_message=str(exc),
                    retry_after_seconds=CONFIGURATION_RETRY_SECONDS,
                    not_sent=True,
                )
                for _ in messages
            ]
        auth = httpx.BasicAuth(self._user, password)
        results: list[SendResult] = []
        step = max(1, int(self._rate))
        for start in range(0, len(messages), step):
            chunk = messages[start : start + step]
            await self._paced(len(chunk))
            results.extend(await asyncio.gather(*(self._one(m, auth, target, public_url) for m in chunk)))
        return results

    async def aclose(self) -> None:
        await self._client.aclose()


def _fields(result: SendResult) -> dict[str, Any]:
    return {f: getattr(result, f) for f in result.__struct_fields__}


# --- webhooks -------------------------------------------------------------------------------------------------------
def signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth token, url + name + value of every POST parameter, sorted by name and
    then value)), as twilio.request_validator computes it."""
    by_name: dict[str, set[str]] = {}
    for name, value in params:
        by_name.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(by_name) for value in sorted(by_name[name]))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode("utf-8"), hashlib.sha1).digest()).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, and with its default port added or removed: Twilio's SDKs accept either (provider-protocols.md §3.3)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if default is None or parts.hostname is None:
        return [url]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    other = host if parts.port else f"{host}:{default}"
    if parts.port not in (None, default):
        return [url]
    return [url, urlunsplit((parts.scheme, other, parts.path, parts.query, parts.fragment))]


STATUSES = {
    "queued": "sending",
    "accepted": "sending",
    "scheduled": "sending",
    "sending": "sending",
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
}


class TwilioWebhooks:
    """POST /public/webhooks/twilio: X-Twilio-Signature with the auth token of the tenant the request is about, over
    the public URL as Twilio requested it (request.url, from DISPATCHER_PUBLIC_URL: never the Host header).

    Keyed: `key_hints` says whose key to look up (unverified), the route fetches those tenants' key references
    (notify_api.webhook_keys_v1) into request.keys, then `parse` verifies with them and parses."""

    provider = NAME

    @staticmethod
    def _form(request: WebhookRequest) -> list[tuple[str, str]]:
        content_type = request.headers.get("content-type", "application/x-www-form-urlencoded")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            raise WebhookRejected("Twilio posts application/x-www-form-urlencoded", status=400)
        try:
            return parse_qsl(request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=200)
        except (UnicodeDecodeError, ValueError):
            raise WebhookRejected("body is not a form", status=400) from None

    def key_hints(self, request: WebhookRequest) -> dict[str, Any]:
        """Whose key to verify with, from the unverified request: the account it names, and the tenant our correlation
        id in the URL names (a status callback) or the number it was written to (an inbound message), or, a number of a
        Messaging Service's pool (no tenant's from_number), the service it names."""
        if not request.url:
            raise WebhookRejected("Twilio webhooks need DISPATCHER_PUBLIC_URL (the URL Twilio signs)", status=404)
        if not request.headers.get("x-twilio-signature"):
            raise WebhookRejected("missing X-Twilio-Signature")
        form = dict(self._form(request))
        tenant_id, _ = parse_correlation_id((parse_qs(request.query).get("nd") or [None])[0])
        number = form.get("From") if "MessageStatus" in form else form.get("To")
        return {
            "account_sid": text(form.get("AccountSid"), 64),
            "tenant_id": str(tenant_id) if tenant_id else None,
            "number": text(number, 64),
            "messaging_service_sid": text(form.get("MessagingServiceSid"), 64),
        }

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        if not request.url:
            raise WebhookRejected("Twilio webhooks need DISPATCHER_PUBLIC_URL (the URL Twilio signs)", status=404)
        offered = request.headers.get("x-twilio-signature", "").encode()
        params = self._form(request)
        verified: UUID | None = None
        unreadable = False
        for key in request.keys:
            try:
                token = resolve((key.get("secrets") or {}).get("auth_token"), Grants.of(key.get("grants")))
            except SecretMissing as exc:
                log.error("twilio auth token unavailable", extra={"tenant_id": key.get("tenant_id"), "reason": str(exc)})
                unreadable = True
                continue
            if token and any(
                hmac.compare_digest(signature(token, u, params).encode(), offered) for u in _url_variants(request.url)
            ):
                verified = UUID(str(key["tenant_id"]))
                break
        if verified is None:
            if unreadable:
                raise WebhookRejected("the auth token to verify this webhook with cannot be read", status=503)
            raise WebhookRejected("X-Twilio-Signature does not match")
        return self._parse(verified, dict(params), request.query, request.body)

    @staticmethod
    def _parse(tenant_id: UUID, form: dict[str, str], query: str, body: bytes) -> ParsedWebhook:
        payload: dict[str, Any] = {k: text(v, 2000) for k, v in form.items()}
        if query:
            payload["_query"] = query[:500]
        sid = text(form.get("MessageSid") or form.get("SmsSid"), 64)
        if not sid:
            return ParsedWebhook(
                event_key="sha256:" + hashlib.sha256(body).hexdigest(),
                payload=payload,
                events=[],
                notes=["no MessageSid: not applied"],
            )
        status = form.get("MessageStatus") or form.get("SmsStatus")
        if "MessageStatus" in form or ("SmsStatus" in form and form.get("SmsStatus") not in ("received", "receiving")):
            key = f"{sid}:{status}"
            mapped = STATUSES.get(status or "")
            if mapped is None:
                return ParsedWebhook(event_key=key, payload=payload, events=[], notes=[f"status {status}: not applied"])
            nd_tenant, delivery_id = parse_correlation_id((parse_qs(query).get("nd") or [None])[0])
            if delivery_id is None or nd_tenant != tenant_id:
                note = "no correlation id in the URL: not applied"
                return ParsedWebhook(event_key=key, payload=payload, events=[], notes=[note])
            code = int(form["ErrorCode"]) if str(form.get("ErrorCode") or "").isdigit() else None
            if mapped == "failed" and code in UNSUBSCRIBED:
                mapped = "suppressed"
            event = StatusEvent(
                status=mapped,
                tenant_id=tenant_id,
                delivery_id=delivery_id,
                # Not the sid: a report that names no delivery of this tenant must match nothing, and the database
                # would otherwise look the sid up across tenants (the worker records the sid at send time anyway).
                provider_message_id=None,
                occurred_at=None,
                error_code=f"twilio_{code}" if code and mapped in ("failed", "suppressed") else None,
                error_message=(text(form.get("ErrorMessage")) or DESCRIPTIONS.get(code or 0)) if code else None,
            )
            return ParsedWebhook(event_key=key + (f":{code}" if code else ""), payload=payload, events=[event])
        # An inbound message: to one of our numbers, from the recipient.
        inbound = InboundMessage(
            to=text(form.get("To"), 64) or "",
            sender=text(form.get("From"), 64),
            message_id=sid,
            text=text(form.get("Body"), 1600),
            received_at=None,
            messaging_service_sid=text(form.get("MessagingServiceSid"), 64),
        )
        return ParsedWebhook(event_key=f"inbound:{sid}", payload=payload, inbound=[inbound], events=[])


KIND = ProviderKind(
    name=NAME,
    channels=("sms",),
    make=lambda c, ctx: Twilio(c.settings, c.secrets, ctx, c.grants),
    webhooks=(Webhook(ROUTE, lambda s: TwilioWebhooks(), needs_public_url=True),),
    endpoint=Endpoint("base_url"),
    reads=("public_url",),
    needs_public_url=True,  # the StatusCallback, and what Twilio signs
)
