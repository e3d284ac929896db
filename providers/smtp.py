"""E-mail over SMTP (aiosmtplib): STARTTLS or implicit TLS, AUTH, per-tenant sender.

One SMTP transaction per recipient, phase by phase (connect, AUTH, MAIL, RCPT, DATA), so that each reply
is classified where it happened: 4xx anywhere -> retry with backoff; 5xx on RCPT -> bounced; 5xx on DATA ->
failed; 5xx on connect/AUTH/MAIL (our configuration) -> retry while an operator fixes it; a timeout or
disconnect inside DATA is ambiguous, and e-mail's policy is to retry (a duplicate beats a loss).
The Message-ID carries our delivery id and stays the same across retries, so receivers can drop duplicates.
Every message of a group is built before any is sent, and each message's build or send error is that message's
outcome alone: one bad message never makes the group's other, already accepted, messages be sent again.
An 8-bit body is declared with BODY=8BITMIME where the server offers it, else sent quoted-printable (7-bit clean).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from typing import Any

import aiosmtplib

from dispatcher.callback_urls import UnsafeUrl, resolve_host
from providers.base import Message, ProviderContext, ProviderKind, SendResult
from providers.secrets import Endpoint, Grants, SecretMissing, resolve
from providers.unsubscribe import make_token

NAME = "smtp"
log = logging.getLogger("providers.smtp")
# CRLF line ends, and no folding of our long id headers (RFC 5322 allows 998 characters a line).
WIRE = policy.SMTP.clone(max_line_length=998)
# Every character str.splitlines() breaks on: the e-mail package refuses a header value containing any of them.
LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _header_text(value: Any) -> str:
    return LINE_BREAKS.sub(" ", str(value))


def build_message(
    message: Message, settings: dict[str, Any], unsubscribe_url: str | None, cte: str | None = None
) -> EmailMessage:
    rendered = message.rendered
    sender = str(settings["from_address"])
    domain = sender.rsplit("@", 1)[1]
    msg = EmailMessage()
    msg["From"] = formataddr((str(settings.get("from_name") or ""), sender)) if settings.get("from_name") else sender
    msg["To"] = message.address
    msg["Subject"] = _header_text(rendered["subject"])
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{message.delivery_id}@{domain}>"
    msg["X-Dispatcher-Correlation"] = message.correlation_id
    esp = settings.get("esp")
    if esp == "sendgrid":
        msg["X-SMTPAPI"] = json.dumps({"unique_args": {"nd_correlation": message.correlation_id}})
    elif esp == "mailgun":
        msg["X-Mailgun-Variables"] = json.dumps({"nd_correlation": message.correlation_id})
    if unsubscribe_url:
        msg["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        if unsubscribe_url.lower().startswith("https://"):  # RFC 8058: one-click only next to an https URI
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(rendered["text"], cte=cte)
    if rendered.get("html"):
        msg.add_alternative(rendered["html"], subtype="html", cte=cte)
    return msg


@dataclass(frozen=True)
class Built:
    """One message ready for the wire: its bytes as built, and a 7-bit clean copy when those are 8-bit."""

    message_id: str
    data: bytes
    seven_bit: bytes | None


def build_wire(message: Message, settings: dict[str, Any], unsubscribe_url: str | None) -> Built:
    msg = build_message(message, settings, unsubscribe_url)
    data = msg.as_bytes(policy=WIRE)
    seven_bit = None
    if not data.isascii():
        seven_bit = build_message(message, settings, unsubscribe_url, cte="quoted-printable").as_bytes(policy=WIRE)
    return Built(msg["Message-ID"].strip("<>"), data, seven_bit)


class Smtp:
    """One tenant's relay."""

    name = NAME

    def __init__(
        self, settings: dict[str, Any], secrets: dict[str, str], ctx: ProviderContext, grants: Grants | None = None
    ) -> None:
        self._settings = settings
        self._password_ref = secrets.get("password")
        self._grants = grants or Grants()
        self._ctx = ctx
        self._limit = asyncio.Semaphore(int(settings.get("max_connections") or 8))
        self._transactional = set(settings.get("transactional_categories") or ["transactional"])

    def _unsubscribe_url(self, message: Message) -> str | None:
        base = self._settings.get("public_url") or self._ctx.settings.public_url
        secret = self._ctx.settings.unsubscribe_secret
        if message.category is None or message.category in self._transactional or not base or not secret:
            return None
        return f"{str(base).rstrip('/')}/public/unsubscribe/{make_token(secret, message.tenant_id, message.delivery_id)}"

    def _port(self) -> int:
        return int(self._settings.get("port") or (465 if (self._settings.get("security") or "starttls") == "tls" else 587))

    async def _socket(self, address: str) -> socket.socket:
        """A connection to the address that passed the endpoint check (the host's name is still used for TLS)."""
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (address, self._port())),
                float(self._settings.get("timeout_seconds") or 30),
            )
        except BaseException:
            sock.close()
            raise
        return sock

    def _client(self, sock: socket.socket) -> aiosmtplib.SMTP:
        s = self._settings
        security = s.get("security") or "starttls"
        context = None
        if not s.get("validate_certs", True):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return aiosmtplib.SMTP(
            hostname=str(s["host"]).strip("[]"),
            sock=sock,
            use_tls=security == "tls",
            start_tls=security == "starttls",
            timeout=float(s.get("timeout_seconds") or 30),
            validate_certs=bool(s.get("validate_certs", True)),
            tls_context=context,
        )

    def _build(self, message: Message) -> Built | SendResult:
        try:
            return build_wire(message, self._settings, self._unsubscribe_url(message))
        except Exception as exc:  # noqa: BLE001 - this message cannot be built: it fails alone, nothing was sent
            return SendResult(
                outcome="failed",
                provider=NAME,
                error_code="message_invalid",
                error_message=f"{type(exc).__name__} while building the message",
            )

    async def _one(self, message: Message, built: Built | SendResult, password: str | None, address: str) -> SendResult:
        if isinstance(built, SendResult):
            return built
        try:
            return await self._send(message, built, password, address)
        except Exception as exc:  # noqa: BLE001 - never let one message's surprise decide the others' outcomes
            log.exception("smtp send crashed", extra={"delivery_id": str(message.delivery_id)})
            return SendResult(
                outcome="retry",
                provider=NAME,
                provider_message_id=built.message_id,
                error_code="provider_exception",
                error_message=type(exc).__name__,
            )

    async def _send(self, message: Message, built: Built, password: str | None, address: str) -> SendResult:
        message_id = built.message_id
        client: aiosmtplib.SMTP | None = None
        phase = "connect"
        async with self._limit:
            try:
                client = self._client(await self._socket(address))
                await client.connect()
                if self._settings.get("username"):
                    phase = "auth"
                    await client.login(str(self._settings["username"]), password or "")
                phase = "mail"
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
                data, options = built.data, []
                if built.seven_bit is not None:
                    if client.supports_extension("8bitmime"):
                        options = ["BODY=8BITMIME"]
                    else:
                        data = built.seven_bit
                await client.mail(str(self._settings["from_address"]), options=options)
                phase = "rcpt"
                await client.rcpt(message.address)
                phase = "data"
                await client.data(data)
                phase = "quit"
                try:
                    await client.quit()
                except aiosmtplib.SMTPException:
                    pass
                return SendResult(outcome="sent", provider=NAME, provider_message_id=message_id)
            except aiosmtplib.SMTPResponseException as exc:
                return self._classify(phase, exc.code, exc.message, message_id)
            except (aiosmtplib.SMTPException, OSError) as exc:
                if phase == "quit":
                    return SendResult(outcome="sent", provider=NAME, provider_message_id=message_id)
                code = "smtp_ambiguous" if phase == "data" else "smtp_unavailable"
                return SendResult(
                    outcome="retry",
                    provider=NAME,
                    provider_message_id=message_id if phase == "data" else None,
                    error_code=code,
                    error_message=f"{type(exc).__name__} during {phase}",
                    not_sent=phase != "data",  # refused, unreachable or dropped before DATA: the relay has nothing
                )
            finally:
                if client is not None:
                    client.close()

    @staticmethod
    def _classify(phase: str, code: int, text: str, message_id: str) -> SendResult:
        error_code, error_message = f"smtp_{code}", f"{code} {text}"[:500]
        before_data = phase in ("connect", "auth", "mail", "rcpt")  # the relay refused before DATA: it accepted nothing
        if 400 <= code < 500 or code == 552 and phase == "rcpt":  # RFC 5321 4.5.3.1.10: 552 on RCPT is 452
            return SendResult(
                outcome="retry", provider=NAME, error_code=error_code, error_message=error_message, not_sent=before_data
            )
        if phase == "rcpt" and not text.startswith("5.7"):
            return SendResult(outcome="bounced", provider=NAME, error_code=error_code, error_message=error_message)
        if phase in ("connect", "auth", "mail") or (phase == "rcpt" and text.startswith("5.7")):
            # Our relay refuses us (credentials, relaying, sender): keep the message while an operator fixes it.
            return SendResult(
                outcome="retry",
                provider=NAME,
                error_code=error_code,
                error_message=error_message,
                retry_after_seconds=300.0,
                not_sent=True,
            )
        return SendResult(outcome="failed", provider=NAME, error_code=error_code, error_message=error_message)

    async def send_many(self, messages: list[Message]) -> list[SendResult]:
        # The relay's addresses are checked at every send (DNS may have changed since the host was saved), the
        # password is read only after, and every connection goes to the checked address.
        try:
            address = await resolve_host(
                str(self._settings["host"]).strip("[]"),
                self._port(),
                allow_private=self._grants.private_endpoints,
                what="provider endpoint",
            )
        except UnsafeUrl as exc:
            log.error("smtp host refused", extra={"reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code="unsafe_endpoint",
                    error_message=str(exc),
                    retry_after_seconds=300.0,
                    not_sent=True,
                )
                for _ in messages
            ]
        try:
            password = resolve(self._password_ref, self._grants)
        except SecretMissing as exc:
            log.error("smtp password unavailable", extra={"reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code=exc.code,
                    error_message=str(exc),
                    retry_after_seconds=300.0,
                    not_sent=True,
                )
                for _ in messages
            ]
        built = [self._build(m) for m in messages]  # all built before any is sent
        return list(await asyncio.gather(*(self._one(m, b, password, address) for m, b in zip(messages, built, strict=True))))

    async def aclose(self) -> None:
        return None


KIND = ProviderKind(
    name=NAME,
    channels=("email",),
    make=lambda c, ctx: Smtp(c.settings, c.secrets, ctx, c.grants),
    endpoint=Endpoint("host", url=False, port_field="port", default_port=587),
    reads=("public_url", "unsubscribe_secret"),
)
