"""The store's URL: checked when the daemon starts (no redis import), and shown without its
password in every message that names the store."""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("redis", "rediss", "unix")


class StoreURLError(ValueError):
    """A store URL that cannot work; the message says what to write instead."""


def parse_store_url(url: str) -> str:
    """Check ``url``; return it as messages show it (no password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise StoreURLError(f"--store/DEBOUNCE_STORE {url!r} is not a URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise StoreURLError(
            f"--store/DEBOUNCE_STORE must be redis://[user:password@]host:port/db, rediss://... "
            f"or unix://path, not {display(url)!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise StoreURLError("--store/DEBOUNCE_STORE: unix:// needs the socket's path, "
                                "as in unix:///run/redis/redis.sock")
        return display(url)
    if not parts.hostname:
        raise StoreURLError(f"--store/DEBOUNCE_STORE {display(url)!r} names no host; write "
                            "redis://host:port/db")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise StoreURLError(f"--store/DEBOUNCE_STORE: the database must be a number, not {db!r}")
    del port
    return display(url)


def display(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
