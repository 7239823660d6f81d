"""Who may reach a server: the loopback addresses, and an API key read from the environment
(never from a command line, where `ps` would show it)."""

from __future__ import annotations

import os

from ..errors import InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key_from_env(var: str | None) -> str | None:
    """The key held in environment variable ``var`` (None: no key); an unset or empty
    variable is an error, so a typo never serves or tests without a key by accident."""
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise InputError(f"--api-key-env {var}: the environment variable {var} is not set or empty")
    return key
