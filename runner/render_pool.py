"""The worker's render pool: it lives in dispatcher/render_pool.py, shared with the API's dry run (the same renderer,
limits and child processes); imported from here by runner/drainer.py."""

from dispatcher.render_pool import RenderPool, RenderTimeout, render_inline, render_many

__all__ = ["RenderPool", "RenderTimeout", "render_inline", "render_many"]
