"""The HTTP layer: Litestar handlers that decode, call one notify_api function, and encode."""
