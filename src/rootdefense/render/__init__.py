"""Rendering of decoding traces: one self-contained HTML page, token by token."""

from rootdefense.render.html import render_trace_page, write_trace_page

__all__ = ["render_trace_page", "write_trace_page"]
