"""The clients. Each API method is written once (in _Api) as a Call: method, path, body, answer type and whether it
is safe to retry; Client runs Calls with httpx.Client, AsyncClient with httpx.AsyncClient."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from dispatcher_client import models as m

T = TypeVar("T")
Retry = Literal["always", "unsent"]  # always: idempotent or keyed; unsent: only if the request never left
RETRY_STATUSES = {429, 503}
_encode = msgspec.json.Encoder().encode


class DispatcherError(Exception):
    """A problem+json answer (RFC 9457): status, type (e.g. "missing_variables"), detail, and the field it names."""

    def __init__(self, status: int, problem: Mapping[str, Any], request_id: str | None) -> None:
        self.status = status
        self.type = str(problem.get("type", "")).rsplit(":", 1)[-1]
        self.title = problem.get("title")
        self.detail = problem.get("detail")
        self.field = problem.get("field")
        self.request_id = request_id
        super().__init__(f"{status} {self.type}: {self.detail or self.title}" + (f" (field {self.field})" if self.field else ""))


@dataclass
class Call(Generic[T]):
    method: str
    path: str
    answer: Any  # the msgspec type of the answer
    body: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry: Retry = "always"
    ok_statuses: tuple[int, ...] = (200, 201, 202)

    def content(self) -> bytes | None:
        return None if self.body is None else _encode(self.body)


def _key() -> str:
    return str(uuid.uuid4())


def _ref(ref: str) -> str:
    return quote(ref, safe="")


class _Api:
    """Every /internal route, as a Call. Answers are msgspec structs (see models.py)."""

    def _call(self, call: Call[Any]) -> Any:  # pragma: no cover - implemented by Client and AsyncClient
        raise NotImplementedError

    # notifications
    def submit(self, intent: m.Intent, *, idempotency_key: str | None = None, request_id: str | None = None) -> m.Accepted:
        """Submits an intent; `Accepted.replayed` says whether the key had been used before (same body)."""
        headers = {"Idempotency-Key": idempotency_key or _key()}
        if request_id:
            headers["X-Request-ID"] = request_id
        return self._call(Call("POST", "/internal/notifications", m.Accepted, intent, headers=headers))

    def preview(self, intent: m.Intent) -> m.Preview:
        """A dry run of `submit(intent)`: nothing is written; per delivery whether it would be sent, when, through
        which provider, its rendered content, or every reason it would not be. Its shape errors raise as submit's do."""
        return self._call(Call("POST", "/internal/notifications/preview", m.Preview, intent))

    def submit_batch(self, intents: Sequence[m.Intent | tuple[m.Intent, str]]) -> m.BatchResult:
        """Up to 1,000 independent intents, each with its own key (given as (intent, key), or generated)."""
        items = [
            {"notification": i[0], "idempotency_key": i[1]}
            if isinstance(i, tuple)
            else {"notification": i, "idempotency_key": _key()}
            for i in intents
        ]
        return self._call(Call("POST", "/internal/notifications/batch", m.BatchResult, {"items": items}))

    def get_notification(self, notification_id: uuid.UUID | str) -> m.Notification:
        return self._call(Call("GET", f"/internal/notifications/{notification_id}", m.Notification))

    def find_notifications(self, *, cursor: str | None = None, limit: int = 50, **filters: str) -> m.NotificationPage:
        """One page of notifications, newest first. Filters: recipient, status, channel, category, template,
        created_from, created_to (ISO 8601), idempotency_key, metadata_key with metadata_value."""
        params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None} | {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._call(Call("GET", "/internal/notifications", m.NotificationPage, params=params))

    def list_deliveries(self, notification_id: uuid.UUID | str, *, cursor: str | None = None, limit: int = 100) -> m.DeliveryPage:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        return self._call(Call("GET", f"/internal/notifications/{notification_id}/deliveries", m.DeliveryPage, params=params))

    def resolve_delivery(self, delivery_id: uuid.UUID | str, status: Literal["sent", "failed"], note: str) -> m.Delivery:
        """Ends an unknown outcome by hand (admin scope); recorded in the delivery's history with the note."""
        body = {"status": status, "note": note}
        return self._call(Call("POST", f"/internal/deliveries/{delivery_id}/resolve", m.Delivery, body, retry="unsent"))

    def set_unknown_deadline(self, channel: m.Channel, after_seconds: int | None) -> dict[str, Any]:
        """How long a delivery on the channel may stay unknown before it becomes failed; None: the default."""
        body = {"after_seconds": after_seconds}
        return self._call(Call("PUT", f"/internal/channels/{channel}/unknown-deadline", dict[str, Any], body))

    def cancel(self, notification_id: uuid.UUID | str) -> m.CancelResult:
        return self._call(Call("POST", f"/internal/notifications/{notification_id}/cancel", m.CancelResult))

    def list_callbacks(self, notification_id: uuid.UUID | str) -> list[m.CallbackMessage]:
        return self._call(Call("GET", f"/internal/notifications/{notification_id}/callbacks", list[m.CallbackMessage]))

    # recipients and consent
    def upsert_recipient(
        self,
        ref: str,
        *,
        addresses: Mapping[str, str | None] | None = None,
        locale: str | None = None,
        timezone: str | None = None,
    ) -> m.RecipientOut:
        body = {k: v for k, v in {"addresses": addresses, "locale": locale, "timezone": timezone}.items() if v is not None}
        return self._call(Call("PUT", f"/internal/recipients/{_ref(ref)}", m.RecipientOut, body))

    def get_recipient(self, ref: str) -> m.RecipientOut:
        return self._call(Call("GET", f"/internal/recipients/{_ref(ref)}", m.RecipientOut))

    def record_consent(
        self,
        ref: str,
        *,
        channel: m.Channel,
        status: Literal["granted", "revoked"],
        source: str,
        category: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> m.ConsentEntry:
        """Appends to the consent ledger: retried only when the request cannot have arrived (it is not idempotent)."""
        body = {
            k: v
            for k, v in {
                "channel": channel,
                "status": status,
                "source": source,
                "category": category,
                "evidence": evidence,
            }.items()
            if v is not None
        }
        return self._call(Call("POST", f"/internal/recipients/{_ref(ref)}/consents", m.ConsentEntry, body, retry="unsent"))

    def list_consents(self, ref: str) -> m.Consents:
        return self._call(Call("GET", f"/internal/recipients/{_ref(ref)}/consents", m.Consents))

    def erase_recipient(self, ref: str) -> m.ErasureReceipt:
        """Erases the recipient's personal data (needs the admin scope); the receipt says what changed."""
        return self._call(Call("DELETE", f"/internal/recipients/{_ref(ref)}", m.ErasureReceipt, retry="unsent"))

    def export_recipient(self, ref: str) -> dict[str, Any]:
        """Everything held about the recipient, as one JSON document (an access request)."""
        return self._call(Call("GET", f"/internal/recipients/{_ref(ref)}/export", dict[str, Any]))

    # templates, channels, callbacks (admin scope)
    def upsert_template(self, key: str, channels: Mapping[str, Any], *, locale: str | None = None) -> list[m.Template]:
        body: dict[str, Any] = {"channels": channels}
        if locale:
            body["locale"] = locale
        return self._call(Call("PUT", f"/internal/templates/{_ref(key)}", list[m.Template], body))

    def list_templates(self, key: str | None = None) -> list[m.Template]:
        return self._call(Call("GET", "/internal/templates", list[m.Template], params={"key": key} if key else None))

    def list_channel_policies(self) -> list[m.Policy]:
        return self._call(Call("GET", "/internal/channels/policies", list[m.Policy]))

    def set_channel_policy(self, channel: m.Channel, policy: Literal["opt_in", "opt_out"]) -> m.Policy:
        return self._call(Call("PUT", f"/internal/channels/{channel}/policy", m.Policy, {"policy": policy}))

    def list_channel_providers(self) -> list[m.ProviderConfig]:
        return self._call(Call("GET", "/internal/channels/providers", list[m.ProviderConfig]))

    def set_channel_provider(
        self,
        channel: m.Channel,
        provider: str,
        *,
        settings: Mapping[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> m.ProviderConfig:
        body = {k: v for k, v in {"provider": provider, "settings": settings, "secrets": secrets}.items() if v is not None}
        return self._call(Call("PUT", f"/internal/channels/{channel}/provider", m.ProviderConfig, body))

    def get_channel_providers(self, channel: m.Channel) -> m.ProviderConfig:
        """The channel's provider and its failover chain in order, each with its health."""
        return self._call(Call("GET", f"/internal/channels/{channel}/providers", m.ProviderConfig))

    def set_channel_providers(self, channel: m.Channel, providers: list[Mapping[str, Any]]) -> m.ProviderConfig:
        """Replaces the channel's whole failover chain: [{provider, settings, secrets}, ...], the primary first."""
        body = {"providers": [dict(p) for p in providers]}
        return self._call(Call("PUT", f"/internal/channels/{channel}/providers", m.ProviderConfig, body))

    def set_callbacks(
        self, url: str | None = None, *, retry_schedule_ms: Sequence[int] | None = None, enabled: bool | None = None
    ) -> m.Callbacks:
        """Sets up status callbacks; the answer holds the whsec_ signing secret the first time only."""
        body = {
            "url": url,
            **({"retry_schedule_ms": list(retry_schedule_ms)} if retry_schedule_ms else {}),
            **({"enabled": enabled} if enabled is not None else {}),
        }
        return self._call(Call("PUT", "/internal/callbacks", m.Callbacks, body))

    def get_callbacks(self) -> m.Callbacks:
        return self._call(Call("GET", "/internal/callbacks", m.Callbacks))

    def rotate_callback_secret(self, overlap_seconds: int = 86_400) -> m.Callbacks:
        return self._call(
            Call("POST", "/internal/callbacks/rotate-secret", m.Callbacks, {"overlap_seconds": overlap_seconds}, retry="unsent")
        )

    # policies: quiet hours and frequency caps (README, "Quiet hours and frequency caps")
    def get_quiet_hours(self) -> m.QuietHours:
        return self._call(Call("GET", "/internal/quiet-hours", m.QuietHours))

    def set_quiet_hours(
        self,
        *,
        start: str | None = None,
        end: str | None = None,
        timezone: str | None = None,
        categories: Mapping[str, m.QuietWindow | Mapping[str, Any]] | None = None,
    ) -> m.QuietHours:
        """Replaces the quiet hours: the default window start-end (HH:MM, both or neither), per-category windows or
        {"exempt": True}, and the time zone of recipients without one."""
        body: dict[str, Any] = {k: v for k, v in {"start": start, "end": end, "timezone": timezone}.items() if v is not None}
        if categories is not None:
            body["categories"] = dict(categories)
        return self._call(Call("PUT", "/internal/quiet-hours", m.QuietHours, body))

    def delete_quiet_hours(self) -> m.QuietHours:
        return self._call(Call("DELETE", "/internal/quiet-hours", m.QuietHours))

    def get_frequency_caps(self) -> m.FrequencyCaps:
        return self._call(Call("GET", "/internal/frequency-caps", m.FrequencyCaps))

    def set_frequency_caps(self, caps: Sequence[m.FrequencyCap | Mapping[str, Any]]) -> m.FrequencyCaps:
        """Replaces the frequency caps ([] removes them)."""
        return self._call(Call("PUT", "/internal/frequency-caps", m.FrequencyCaps, {"caps": list(caps)}))

    def delete_frequency_caps(self) -> m.FrequencyCaps:
        return self._call(Call("DELETE", "/internal/frequency-caps", m.FrequencyCaps))

    def list_mock_messages(self, delivery_id: uuid.UUID | str | None = None, limit: int = 100) -> list[m.MockMessage]:
        params: dict[str, Any] = {"limit": limit}
        if delivery_id:
            params["delivery_id"] = str(delivery_id)
        return self._call(Call("GET", "/internal/mock/messages", list[m.MockMessage], params=params))


class _Runner:
    def __init__(self, base_url: str, api_key: str, *, max_retries: int = 4, backoff_seconds: float = 0.2) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {
            "Authorization": f"Bearer {api_key}",
            "content-type": "application/json",
            "user-agent": "notification-dispatcher-client/0.1",
        }
        self.max_retries = max_retries
        self.backoff = backoff_seconds

    def _prepare(self, call: Call[Any]) -> dict[str, Any]:
        headers = {**self.headers, "X-Request-ID": uuid.uuid4().hex, **call.headers}
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "content": call.content(),
            "headers": headers,
            "params": params or None,
        }

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = response.headers.get("retry-after") if response is not None else None
        if hinted and hinted.replace(".", "", 1).isdigit():
            return min(float(hinted), 30.0)
        return min(self.backoff * 2**attempt, 10.0) * (0.5 + random.random() / 2)

    def _retryable(self, call: Call[Any], error: BaseException | None, response: httpx.Response | None) -> bool:
        if error is not None:
            unsent = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            return unsent or (call.retry == "always" and isinstance(error, httpx.TransportError))
        assert response is not None
        return response.status_code == 429 or (response.status_code == 503 and call.retry == "always")

    @staticmethod
    def _decode(call: Call[Any], response: httpx.Response) -> Any:
        if response.status_code not in call.ok_statuses:
            try:
                problem = msgspec.json.decode(response.content)
            except msgspec.DecodeError:
                problem = {"title": response.text[:200]}
            raise DispatcherError(
                response.status_code, problem if isinstance(problem, dict) else {}, response.headers.get("x-request-id")
            )
        answer = msgspec.json.decode(response.content, type=call.answer)
        if isinstance(answer, m.Accepted) and response.headers.get("idempotent-replayed") == "true":
            answer.replayed = True
        return answer


class Client(_Runner, _Api):
    """Synchronous client: `with Client(url, key) as nd: nd.submit(...)`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries=max_retries)
        self.http = httpx.Client(timeout=timeout, transport=transport)

    def _call(self, call: Call[Any]) -> Any:
        request = self._prepare(call)  # one request id and idempotency key for every retry
        for attempt in range(self.max_retries + 1):
            response = error = None
            try:
                response = self.http.request(**request)
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.max_retries and self._retryable(call, error, response):
                time.sleep(self._delay(attempt, response))
                continue
            if error is not None:
                raise error
            assert response is not None
            return self._decode(call, response)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Runner, _Api):
    """Asynchronous client with the same methods, each awaitable: `async with AsyncClient(url, key) as nd: await "
    "nd.submit(...)`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries=max_retries)
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def _call(self, call: Call[Any]) -> Any:  # type: ignore[override]
        request = self._prepare(call)
        for attempt in range(self.max_retries + 1):
            response = error = None
            try:
                response = await self.http.request(**request)
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.max_retries and self._retryable(call, error, response):
                await asyncio.sleep(self._delay(attempt, response))
                continue
            if error is not None:
                raise error
            assert response is not None
            return self._decode(call, response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def verify_callback(body: bytes, headers: Mapping[str, str], secrets: str | Sequence[str]) -> m.CallbackEvent:
    """Checks a status callback's Standard Webhooks signature (and its timestamp, within 5 minutes) over the raw body
    with the reference `standardwebhooks` library; returns the typed event. Give two secrets while rotating.
    Raises standardwebhooks.WebhookVerificationError if no secret verifies it."""
    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    lowered = {k.lower(): v for k, v in headers.items()}
    last: Exception | None = None
    for secret in [secrets] if isinstance(secrets, str) else secrets:
        try:
            payload = Webhook(secret).verify(body, lowered)
        except WebhookVerificationError as exc:
            last = exc
            continue
        event = msgspec.convert(payload, m.CallbackEvent, strict=False)
        event.webhook_id = lowered["webhook-id"]
        return event
    raise last or WebhookVerificationError("no secret given")
