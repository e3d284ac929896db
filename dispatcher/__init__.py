"""notification-dispatcher: shared pieces of the API, the worker and the CLI."""

__version__ = "0.1.0"
