"""A typed Python client for notification-dispatcher's /internal API, sync and async, on httpx and msgspec.

    from dispatcher_client import Client, Intent, Recipient
    with Client("http://dispatcher:8000", api_key) as nd:
        accepted = nd.submit(Intent(recipient=Recipient(ref="runner-42"), channels=["whatsapp", "email"],
                                    template="event_reminder", variables={"name": "Ana", "event": "Long run"}),
                             idempotency_key="reminder:evt-7:runner-42")

Every submission carries an idempotency key (one is generated when none is given) and an X-Request-ID, both kept
across retries, so retrying after a network error or a 503 never sends twice. `verify_callback` checks a status
callback's Standard Webhooks signature and returns the typed event. See docs/client.md.
"""

from dispatcher_client.client import AsyncClient, Client, DispatcherError, verify_callback
from dispatcher_client.models import (
    Accepted,
    BatchResult,
    CallbackEvent,
    CallbackMessage,
    Callbacks,
    CancelResult,
    Consents,
    Delivery,
    DeliveryPage,
    ErasureReceipt,
    FanoutRecipient,
    FoundNotification,
    FrequencyCap,
    FrequencyCaps,
    Intent,
    MockMessage,
    Notification,
    NotificationPage,
    Policy,
    Preview,
    PreviewDelivery,
    PreviewReason,
    ProviderConfig,
    QuietHours,
    QuietWindow,
    Recipient,
    RecipientOut,
    RouteStep,
    StatusChange,
    Template,
)

__all__ = [
    "Accepted",
    "AsyncClient",
    "BatchResult",
    "CallbackEvent",
    "CallbackMessage",
    "Callbacks",
    "CancelResult",
    "Client",
    "Consents",
    "Delivery",
    "DeliveryPage",
    "DispatcherError",
    "ErasureReceipt",
    "FanoutRecipient",
    "FoundNotification",
    "FrequencyCap",
    "FrequencyCaps",
    "Intent",
    "MockMessage",
    "Notification",
    "NotificationPage",
    "Policy",
    "Preview",
    "PreviewDelivery",
    "PreviewReason",
    "ProviderConfig",
    "QuietHours",
    "QuietWindow",
    "Recipient",
    "RecipientOut",
    "RouteStep",
    "StatusChange",
    "Template",
    "verify_callback",
]
