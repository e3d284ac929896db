"""The HTTP routes, one module per route group (api/app.py mounts them):

- notifications: /internal/notifications (submit, batch, read, cancel, callbacks of one notification)
- recipients: /internal/recipients (addresses, consent)
- templates: /internal/templates
- channels: /internal/channels (providers and consent policies)
- callbacks: /internal/callbacks (status callback settings)
- mock: /internal/mock (the mock provider's messages)
- retention: /internal/retention (how long personal data and history are kept)
- policies: /internal/quiet-hours, /internal/frequency-caps (when deliveries are held, how many a recipient gets)
- webhooks: /public (provider webhooks, WhatsApp's handshake, one-click unsubscribe)
- health: /health, /version (and the benchmark's baseline route)

`common` holds what they share: the error responses, the guarded Tenant, and `sql_json`.
"""
