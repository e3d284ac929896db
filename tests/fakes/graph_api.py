"""An HTTP fake of the WhatsApp Cloud (Graph) API, serving over a real socket.

It records every request, returns wamids, injects Meta error codes, throttling and timeouts per recipient,
and posts status webhooks signed with X-Hub-Signature-256 to the dispatcher — shuffled and with duplicates,
as Meta does. It can also post inbound messages (for the 24-hour window and opt-out keywords).

Meta's 2026 shapes: a recipient may be sent to by its business-scoped user id (`recipient`, not `to`); statuses carry
`recipient_user_id` for users it knows a BSUID of (`users`), and no `recipient_id` for users whose phone number is
hidden (`hidden_phones`, a username); statuses carry `pricing`; it posts `user_id_update`, `template_category_update`
and `business_capability_update` changes.

    python -m tests.fakes.graph_api --port 9100 --webhook http://127.0.0.1:8000/public/webhooks/whatsapp --app-secret S
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

ERRORS = {
    130429: "(#130429) Rate limit hit",
    131056: "(#131056) Pair rate limit hit",
    131047: "Re-engagement message",
    131026: "Message undeliverable",
    132001: "Template name does not exist in the translation",
    190: "Access token expired",
    131050: "User has stopped marketing messages",
    131049: "This message was not delivered to maintain healthy ecosystem engagement.",
    131000: "Something went wrong",
}


class _Server(ThreadingHTTPServer):
    """socketserver's listen backlog is 5: a worker's burst of concurrent sends on a loaded machine overflowed it,
    and a connection the kernel had completed but the server never accepted was reset after the request was written
    (a ReadError, so an `unknown` WhatsApp delivery). Meta's edge does not do that; the fake should not either."""

    request_queue_size = 256


@dataclass
class GraphFake:
    access_token: str = "test-token"
    app_secret: str = "test-app-secret"
    webhook_url: str | None = None
    phone_number_id: str = "106540352242922"
    # per recipient (digits, no +): a list of scripted replies, used in order, the last one repeating:
    # "ok", "error:<code>", "timeout", "http500", "http503", "async_failed:<code>", "silent"
    scripts: dict[str, list[str]] = field(default_factory=dict)
    duplicate_webhooks: bool = True
    outage: str | None = None  # while set (a script step, e.g. "http503"), every send gets that answer: an outage
    status_delay: float = 0.05
    requests: list[dict[str, Any]] = field(default_factory=list)
    posted: list[tuple[str, int]] = field(default_factory=list)  # (status, HTTP answer) of every webhook sent
    accepted: list[str] = field(default_factory=list)  # the recipient of every message given a wamid
    users: dict[str, str] = field(default_factory=dict)  # BSUID -> phone digits ("" for a user known only by BSUID)
    hidden_phones: set[str] = field(default_factory=set)  # phone digits a status never shows (users with a username)
    pricing_category: str = "utility"  # what status pricing says (marketing, utility, authentication, service)
    waba_id: str = "102290129340398"
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
                body = json.loads(self.rfile.read(length) or b"{}")
                status, reply, delay = fake.handle(self.path, self.headers.get("authorization", ""), body)
                if delay:
                    time.sleep(delay)
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = _Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # -- the messages endpoint ------------------------------------------------------------------------------
    def _next_script(self, to: str) -> str:
        with self._lock:
            steps = self.scripts.get(to) or ["ok"]
            return steps.pop(0) if len(steps) > 1 else steps[0]

    def handle(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
        with self._lock:
            self.requests.append({"path": path, "authorization": auth, "body": body})
        if not path.endswith(f"/{self.phone_number_id}/messages"):
            return 400, {"error": {"code": 100, "message": "Unsupported post request"}}, 0
        if auth != f"Bearer {self.access_token}":
            return 401, {"error": {"code": 190, "message": ERRORS[190], "type": "OAuthException"}}, 0
        # `to` (a phone number) wins over `recipient` (a BSUID) when both are given, as Meta documents.
        to = str(body.get("to") or body.get("recipient") or "")
        script = self.outage or self._next_script(to)
        if script == "timeout":
            return 200, {"messaging_product": "whatsapp"}, 30.0
        if script == "http500":
            return 500, {}, 0
        if script == "http503":  # Meta's "API Service temporarily unavailable"
            return 503, {"error": {"code": 2, "message": "Service temporarily unavailable", "type": "OAuthException"}}, 0
        if script.startswith("error:"):
            code = int(script.split(":")[1])
            return (
                400,
                {
                    "error": {
                        "message": ERRORS.get(code, "error"),
                        "type": "OAuthException",
                        "code": code,
                        "fbtrace_id": "Az8or2yhqkZfEZ",
                    }
                },
                0,
            )
        wamid = f"wamid.fake-{next(self._counter)}"
        with self._lock:
            self.accepted.append(to)
        if script != "silent":
            final = ["sent", "delivered", "read"]
            if script.startswith("async_failed:"):
                final = ["sent", ("failed", int(script.split(":")[1]))]  # type: ignore[list-item]
            threading.Thread(
                target=self._post_statuses, args=(wamid, to, body.get("biz_opaque_callback_data"), final), daemon=True
            ).start()
        contact = {"input": to, "user_id": to} if "." in to else {"input": to, "wa_id": to}
        return (
            200,
            {"messaging_product": "whatsapp", "contacts": [contact], "messages": [{"id": wamid, "message_status": "accepted"}]},
            0,
        )

    # -- webhooks -------------------------------------------------------------------------------------------
    def sign(self, raw: bytes) -> str:
        return "sha256=" + hmac.new(self.app_secret.encode(), raw, hashlib.sha256).hexdigest()

    def post_webhook(self, value: dict[str, Any], field: str = "messages", metadata: bool = True) -> int:
        assert self.webhook_url, "no webhook_url"
        head: dict[str, Any] = {"messaging_product": "whatsapp"} if field in ("messages", "user_id_update") else {}
        if metadata:
            head["metadata"] = {"display_phone_number": "15550783881", "phone_number_id": self.phone_number_id}
        envelope = {
            "object": "whatsapp_business_account",
            "entry": [{"id": self.waba_id, "changes": [{"field": field, "value": {**head, **value}}]}],
        }
        raw = json.dumps(envelope).encode()
        response = httpx.post(
            self.webhook_url,
            content=raw,
            timeout=10,
            headers={"content-type": "application/json", "x-hub-signature-256": self.sign(raw)},
        )
        return response.status_code

    def _post_statuses(self, wamid: str, to: str, tracker: str | None, statuses: list[Any]) -> None:
        if not self.webhook_url:
            return
        now = int(time.time())
        payloads = []
        for status in statuses:
            name, code = status if isinstance(status, tuple) else (status, None)
            item: dict[str, Any] = {"id": wamid, "status": name, "timestamp": str(now)}
            phone = to if "." not in to else self.users.get(to, "")
            bsuid = to if "." in to else next((b for b, p in self.users.items() if p == to), None)
            if phone and phone not in self.hidden_phones:
                item["recipient_id"] = phone
            if bsuid:
                item["recipient_user_id"] = bsuid
            if name != "failed":
                item["pricing"] = {"billable": True, "pricing_model": "PMP", "category": self.pricing_category, "type": "regular"}
            if tracker:
                item["biz_opaque_callback_data"] = tracker
            if code:
                item["errors"] = [{"code": code, "title": ERRORS.get(code, "error"), "message": ERRORS.get(code, "error")}]
            payloads.append({"statuses": [item]})
        if self.duplicate_webhooks:
            payloads.append(random.choice(payloads))
        random.shuffle(payloads)
        for value in payloads:
            time.sleep(self.status_delay)
            answer = 0
            for _ in range(5):
                try:
                    answer = self.post_webhook(value)
                    if answer < 300:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            with self._lock:
                self.posted.append((value["statuses"][0]["status"], answer))

    def inbound(self, sender: str, text: str, user_id: str | None = None) -> int:
        """A user writes to the business number: by phone number (sender), with its BSUID (user_id), or by BSUID alone
        (sender "" : a user with a username whose phone number is hidden)."""
        phone = sender.lstrip("+")
        contact: dict[str, Any] = {"profile": {"name": "Test"}}
        message: dict[str, Any] = {
            "id": f"wamid.in-{next(self._counter)}",
            "timestamp": str(int(time.time())),
            "type": "text",
            "text": {"body": text},
        }
        if phone:
            contact["wa_id"] = phone
            message["from"] = phone
        if user_id:
            contact["user_id"] = user_id
            message["from_user_id"] = user_id
        return self.post_webhook({"contacts": [contact], "messages": [message]})

    def user_id_update(self, previous: str, current: str, phone: str | None = None) -> int:
        """The user's BSUID changed (e.g. a new phone number)."""
        item: dict[str, Any] = {"user_id": {"previous": previous, "current": current}, "timestamp": str(int(time.time()))}
        if phone:
            item["wa_id"] = phone.lstrip("+")
        return self.post_webhook({"user_id_update": [item]}, field="user_id_update")

    def template_category_update(
        self, name: str, language: str, new: str, previous: str | None = None, correct: str | None = None
    ) -> int:
        """Meta changed (previous given) or will change (correct given) an approved template's category."""
        value: dict[str, Any] = {
            "message_template_id": 1234567890,
            "message_template_name": name,
            "message_template_language": language,
            "new_category": new.upper(),
        }
        if previous:
            value["previous_category"] = previous.upper()
        if correct:
            value.update(correct_category=correct.upper(), category_update_timestamp=int(time.time()) + 86400)
        return self.post_webhook(value, field="template_category_update", metadata=False)

    def business_capability_update(self, tier: str) -> int:
        """The portfolio's messaging limit tier changed."""
        value = {"max_phone_numbers_per_business": 2, "whatsapp_business_manager_messaging_limit": tier}
        return self.post_webhook(value, field="business_capability_update", metadata=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--webhook", default=None)
    parser.add_argument("--app-secret", default="test-app-secret")
    parser.add_argument("--access-token", default="test-token")
    args = parser.parse_args()
    fake = GraphFake(access_token=args.access_token, app_secret=args.app_secret, webhook_url=args.webhook)
    print(f"Graph API fake on {fake.start(args.port)} (phone_number_id {fake.phone_number_id})", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
