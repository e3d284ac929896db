"""A real SMTP server (aiosmtpd) for tests: records every message, scripts replies per recipient,
and optionally requires STARTTLS and AUTH with a self-signed certificate made on the fly.

Scripts by recipient address: "rcpt:550 5.1.1 No such user", "rcpt:451 4.3.0 Try later",
"data:554 5.7.1 Rejected", "data:timeout" (never answers DATA).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def self_signed_context() -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder = tempfile.mkdtemp()
    cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage
    raw: bytes
    mail_options: list[str] = field(default_factory=list)


@dataclass
class SmtpFake:
    scripts: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    require_tls_auth: bool = False
    credentials: tuple[str, str] = ("mailer", "s3cret")
    controller: Controller | None = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:  # noqa: N802
        script = self.scripts.get(address, "")
        if script.startswith("rcpt:"):
            return script[5:]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        for rcpt in envelope.rcpt_tos:
            script = self.scripts.get(rcpt, "")
            if script == "data:timeout":
                await asyncio.sleep(3600)
            if script.startswith("data:"):
                return script[5:]
        raw = envelope.original_content or envelope.content
        message = message_from_bytes(raw, policy=policy.default)
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                message,
                raw,  # type: ignore[arg-type]
                list(envelope.mail_options or []),
            )
        )
        return "250 2.0.0 OK queued as FAKE"

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        return AuthResult(success=ok, handled=False)

    def start(self, port: int = 0) -> int:
        """Listens on port (0: a free one); start(port) again after stop() brings the same server back."""
        kwargs: dict[str, Any] = {}
        if self.require_tls_auth:
            kwargs = {
                "tls_context": self_signed_context(),
                "require_starttls": True,
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": True,
            }
        if not port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
        self.controller = Controller(self, hostname="127.0.0.1", port=port, **kwargs)
        self.controller.start()
        return port

    def stop(self) -> None:
        if self.controller:
            self.controller.stop()
