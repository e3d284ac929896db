"""The worker's rendering: the bounded sandbox lives in dispatcher/render.py (the API compiles templates with it when
they are saved); runner/render_pool.py runs it in child processes."""

from dispatcher.render import LINE_BREAKS, Limits, OutputTooLarge, RenderError, check_syntax, fill, render

__all__ = ["LINE_BREAKS", "Limits", "OutputTooLarge", "RenderError", "check_syntax", "fill", "render"]
