"""An HTTP fake of Twilio's Programmable Messaging API, serving over a real socket.

It records every request (with its basic-auth user and password), answers POST .../Accounts/{AccountSid}/Messages.json
with a message sid, injects Twilio error codes, throttling (429 with Retry-After), server errors, timeouts and connection
resets per recipient, and posts status callbacks to each message's StatusCallback — signed with X-Twilio-Signature over
that URL as given, shuffled and with duplicates, as Twilio does. It can also post inbound messages (STOP, START, HELP).

Behind a reverse proxy, Twilio requests the public URL while our API listens elsewhere: `deliver_to` (our API's real base
URL) replaces the scheme and host the fake connects to, and the signature stays over the public URL (with `Host:` the
API's address, as a proxy that rewrites it sends).

    python -m tests.fakes.twilio --port 9200 --deliver-to http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx


def sign(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's X-Twilio-Signature, written out here on its own (not the dispatcher's code): base64 of HMAC-SHA1 over the
    URL followed by every parameter's name and value, sorted by name (twilio.request_validator.compute_signature)."""
    data = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode("utf-8"), hashlib.sha1).digest()).decode()


ERRORS = {
    20003: (401, "Authenticate"),
    20429: (429, "Too Many Requests"),
    14107: (429, "SMS send rate limit exceeded"),
    21211: (400, "The 'To' number is not a valid phone number."),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21614: (400, "'To' number is not a valid mobile number"),
    21408: (400, "Permission to send an SMS has not been enabled for the region indicated by the 'To' number"),
}


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # as the Graph fake: a worker's burst must not overflow the listen backlog


@dataclass
class TwilioFake:
    account_sid: str = "AC" + "0" * 31 + "1"
    auth_token: str = "test-auth-token"
    api_key_sid: str = "SK" + "0" * 31 + "2"
    api_key_secret: str = "test-api-key-secret"
    deliver_to: str | None = None  # our API's base URL (the status callbacks' public URL is rewritten to it)
    # per recipient (E.164): a list of scripted replies, used in order, the last one repeating:
    # "ok", "error:<code>", "timeout", "reset", "http500", "http503", "async_failed:<code>" (undelivered), "silent"
    scripts: dict[str, list[str]] = field(default_factory=dict)
    duplicate_webhooks: bool = True
    status_delay: float = 0.05
    retry_after: str = "1"
    requests: list[dict[str, Any]] = field(default_factory=list)
    posted: list[tuple[str, int]] = field(default_factory=list)  # (status, HTTP answer) of every callback sent
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- server ---------------------------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        """Serves on 127.0.0.1 (port 0: a free one) in a thread; returns the base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(length).decode()
                status, reply, delay, headers = fake.handle(self.path, self.headers.get("authorization", ""), raw)
                if status == 0:  # a reset after the request was read: the client cannot know what happened
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if delay:
                    time.sleep(delay)
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        self._server = _Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # -- the Messages endpoint ------------------------------------------------------------------------------
    def _next_script(self, to: str) -> str:
        with self._lock:
            steps = self.scripts.get(to) or ["ok"]
            return steps.pop(0) if len(steps) > 1 else steps[0]

    def _credentials(self, authorization: str) -> tuple[str, str]:
        if not authorization.startswith("Basic "):
            return "", ""
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        return user, password

    def handle(self, path: str, authorization: str, raw: str) -> tuple[int, dict[str, Any], float, dict[str, str]]:
        form = dict(parse_qsl(raw, keep_blank_values=True))
        user, password = self._credentials(authorization)
        with self._lock:
            self.requests.append({"path": path, "user": user, "password": password, "form": form})
        if path != f"/2010-04-01/Accounts/{self.account_sid}/Messages.json":
            return 404, {"code": 20404, "message": "The requested resource was not found", "status": 404}, 0, {}
        if (user, password) not in ((self.account_sid, self.auth_token), (self.api_key_sid, self.api_key_secret)):
            return 401, {"code": 20003, "message": "Authenticate", "status": 401}, 0, {}
        if not form.get("To") or not (form.get("From") or form.get("MessagingServiceSid")):
            return (
                400,
                {"code": 21604, "message": "A 'To' and a 'From' or MessagingServiceSid are required", "status": 400},
                0,
                {},
            )
        to = form["To"]
        script = self._next_script(to)
        if script == "timeout":
            return 201, {}, 30.0, {}
        if script == "reset":
            return 0, {}, 0, {}
        if script == "http500":
            return 500, {"code": 20500, "message": "Internal Server Error", "status": 500}, 0, {}
        if script == "http503":
            return 503, {"code": 20503, "message": "Service Unavailable", "status": 503}, 0, {"retry-after": self.retry_after}
        if script.startswith("error:"):
            code = int(script.split(":")[1])
            http, message = ERRORS.get(code, (400, "error"))
            extra = {"retry-after": self.retry_after} if http == 429 else {}
            return (
                http,
                {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": http},
                0,
                extra,
            )
        sid = f"SM{next(self._counter):032x}"
        if script != "silent" and form.get("StatusCallback"):
            final: list[Any] = ["queued", "sent", "delivered"]
            if script.startswith("async_failed:"):
                final = ["queued", "sent", ("undelivered", int(script.split(":")[1]))]
            threading.Thread(target=self._post_statuses, args=(sid, form, final), daemon=True).start()
        body = form.get("Body", "")
        return (
            201,
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": body,
                "status": "accepted" if form.get("MessagingServiceSid") else "queued",
                "num_segments": "1" if len(body) <= 160 else str(-(-len(body) // 153)),
                "error_code": None,
                "error_message": None,
                "api_version": "2010-04-01",
            },
            0,
            {},
        )

    # -- webhooks -------------------------------------------------------------------------------------------
    def post_signed(self, public_url: str, params: dict[str, str], token: str | None = None, host: str | None = None) -> int:
        """Posts a form to `public_url` as Twilio would: signed over that URL; sent to deliver_to when set (a proxy)."""
        target = public_url
        if self.deliver_to:
            real, parts = urlsplit(self.deliver_to), urlsplit(public_url)
            target = urlunsplit((real.scheme, real.netloc, parts.path, parts.query, ""))
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": sign(token or self.auth_token, public_url, params),
            "i-twilio-idempotency-token": f"{params.get('MessageSid')}-{params.get('MessageStatus', 'in')}",
        }
        if host:
            headers["host"] = host
        return httpx.post(target, content=urlencode(params).encode(), headers=headers, timeout=10).status_code

    def _post_statuses(self, sid: str, form: dict[str, str], statuses: list[Any]) -> None:
        callbacks = []
        for status in statuses:
            name, code = status if isinstance(status, tuple) else (status, None)
            params = {
                "AccountSid": self.account_sid,
                "ApiVersion": "2010-04-01",
                "From": form.get("From") or "+15005550006",
                "To": form["To"],
                "MessageSid": sid,
                "SmsSid": sid,
                "MessageStatus": name,
                "SmsStatus": name,
            }
            if form.get("MessagingServiceSid"):
                params["MessagingServiceSid"] = form["MessagingServiceSid"]
            if code:
                params["ErrorCode"] = str(code)
            callbacks.append(params)
        if self.duplicate_webhooks:
            callbacks.append(random.choice(callbacks))
        random.shuffle(callbacks)
        for params in callbacks:
            time.sleep(self.status_delay)
            answer = 0
            for _ in range(5):
                try:
                    answer = self.post_signed(form["StatusCallback"], params)
                    if answer < 300:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            with self._lock:
                self.posted.append((params["MessageStatus"], answer))

    def inbound(
        self, public_url: str, sender: str, to: str, body: str, token: str | None = None, messaging_service_sid: str | None = None
    ) -> int:
        """A recipient texts one of our numbers: Twilio posts the message to the number's webhook URL (public_url). A
        number in a Messaging Service's sender pool: the form names the service (MessagingServiceSid), as Twilio's does."""
        n = next(self._counter)
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "MessageSid": f"SM{n:032x}",
            "SmsMessageSid": f"SM{n:032x}",
            "SmsSid": f"SM{n:032x}",
            "SmsStatus": "received",
            "From": sender,
            "To": to,
            "Body": body,
            "NumMedia": "0",
            "NumSegments": "1",
            "FromCountry": "ES",
            "ToCountry": "US",
        }
        if messaging_service_sid:
            params["MessagingServiceSid"] = messaging_service_sid
        return self.post_signed(public_url, params, token=token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--deliver-to", default=None)
    parser.add_argument("--auth-token", default="test-auth-token")
    args = parser.parse_args()
    fake = TwilioFake(auth_token=args.auth_token, deliver_to=args.deliver_to)
    print(f"Twilio fake on {fake.start(args.port)} (account {fake.account_sid})", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
