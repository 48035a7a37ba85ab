"""URLs as they may be written down or shown: without the user name, password or signed query they can carry."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*"  # RFC 3986: a letter, then letters, digits, ``+``, ``-``, ``.``
# a URL: ``scheme://``, or an fsspec chain ``proto::...``
_URL = re.compile(rf"{_SCHEME}(?:://|::)")
# ``scheme://user:password@``: what is dropped of each authority (up to its last ``@``, as URL parsers read it)
_USER_INFO = re.compile(rf"({_SCHEME}://)[^/]*@")
# a URL inside free text (an error message): it runs to the next blank or quote
_URL_IN_TEXT = re.compile(rf"{_SCHEME}://[^\s'\"<>`]*")


def redact_url(url: str | os.PathLike) -> str:
    """``url`` without its user info (``user:password@``), query (``?X-Amz-Signature=...``) and fragment:
    scheme, host, port and path are kept (of every URL of an fsspec chain ``a::b://...``). A plain path
    (no ``scheme://``) is returned unchanged."""
    s = os.fspath(url)
    if not _URL.match(s):
        return s
    s = re.split(r"[?#]", s, maxsplit=1)[0]
    return _USER_INFO.sub(r"\1", s)


def redact_urls(value: Any) -> Any:
    """``value`` (JSON-like: mappings, lists, strings, numbers) with every URL in it passed through
    :func:`redact_url`: a string that is one URL (no blanks) as a whole, and each URL inside a text (a
    message)."""
    if isinstance(value, Mapping):
        return {k: redact_urls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_urls(v) for v in value]
    if not isinstance(value, str) or "://" not in value:
        return value
    if _URL.match(value) and not re.search(r"\s", value):
        return redact_url(value)
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), value)
