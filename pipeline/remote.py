"""Where a store lives: a local path, ``file://``, ``s3://`` or ``http(s)://`` (docs/SHARING.md).

Every command that reads a store takes any of these; writing works for local paths, ``file://`` and
``s3://`` (``http(s)://`` is read-only). An ``s3://`` store's endpoint and credentials come from the
usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) or from
``CROSSTVR_S3_ENDPOINT``, which the command line's ``--s3-endpoint`` sets (a MinIO box, a local test
server). Nothing here opens a connection until a store is opened.
"""

from __future__ import annotations

import os
from typing import Any

from core.errors import StoreError

S3_ENDPOINT_VARS = ("CROSSTVR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
READ_ONLY_SCHEMES = ("http", "https")
SCHEMES = ("file", "s3", "http", "https")


def scheme(url: str | os.PathLike) -> str:
    """``file`` for a local path, else the URL's scheme (``s3``, ``http``, ...)."""
    s = os.fspath(url)
    return s.split("://", 1)[0].lower() if "://" in s else "file"


def is_remote(url: str | os.PathLike) -> bool:
    """Whether the store is reached over the network (anything but a path or ``file://``)."""
    return scheme(url) != "file"


def is_read_only(url: str | os.PathLike) -> bool:
    """Whether stores at ``url`` can only be read (``http(s)://``)."""
    return scheme(url) in READ_ONLY_SCHEMES


def s3_endpoint() -> str | None:
    """The S3 endpoint the environment names (``CROSSTVR_S3_ENDPOINT``, then AWS's variables)."""
    for var in S3_ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def storage_options(url: str | os.PathLike, given: dict | None = None) -> dict | None:
    """fsspec options for the store at ``url``: ``given`` when set; for ``s3://``, the endpoint and
    credentials from the environment (s3fs also reads AWS's credential files itself)."""
    if given is not None:
        return given
    kind = scheme(url)
    if kind not in SCHEMES:
        raise StoreError(f"{os.fspath(url)}: unsupported store URL scheme {kind!r} (a path, file://, s3://, "
                         f"http(s)://)")
    if kind != "s3":
        return None
    opts: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def filesystem(url: str | os.PathLike, options: dict | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url`` (synchronous; for copying whole files)."""
    import fsspec

    s = os.fspath(url)
    opts = storage_options(s, options) or {}
    try:
        fs, path = fsspec.core.url_to_fs(s, **opts)
    except ImportError as exc:
        raise StoreError(f"{s}: {exc} (pip install -r requirements.txt)") from exc
    return fs, path


def join(url: str | os.PathLike, *parts: str) -> str:
    """``url`` with ``parts`` appended by ``/`` (paths and URLs alike)."""
    s = os.fspath(url).rstrip("/")
    return "/".join([s, *[p.strip("/") for p in parts]])
