"""Credentials in store URLs: kept in this process, never written down.

A tracking URI or an Optuna URL may carry a password (`postgresql://user:secret@db/optuna`,
`https://user:token@mlflow.example.org`) or a secret query parameter (`?password=...`). The service works with the
*redacted* form everywhere it writes or prints (console, plan file, MLflow params and artifacts, Tune's pickled
experiment state) and turns it back into the real URL only at the moment it opens a connection, through `reveal`,
which looks the URL up in a table that lives in the driver process alone. Credentials can also come from the
environment, where the clients read them themselves: `PGPASSWORD` for PostgreSQL, `MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD` for an MLflow server, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` for S3.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAMS = re.compile(r"pass(word)?|secret|token|key|credential|signature|auth", re.IGNORECASE)
#: scheme://user:password@ anywhere in a text (a space file, an error message)
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>[^@/\s'\"]+)@")

_real: dict[str, str] = {}  # redacted URL -> URL with its credentials, for this process only


def redact(url: str | None) -> str | None:
    """The URL with its password and secret query parameters replaced by `***` (None stays None)."""
    if url is None or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        if ":" in userinfo:
            netloc = f"{user}:{MASK}@{host}"
        elif parts.scheme in ("http", "https"):  # https://TOKEN@host: a lone user part of a web URL is a token
            netloc = f"{MASK}@{host}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, MASK if SECRET_PARAMS.search(k) else v) for k, v in pairs]
        if masked != pairs:
            query = urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # untouched, byte for byte (urlunsplit would fold sqlite:////abs/path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` in a free text with its password masked."""
    return USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def remember(url: str | None) -> str | None:
    """Keep `url` in this process and return its redacted form, which `reveal` maps back."""
    safe = redact(url)
    if url is not None and safe is not None:
        _real[safe] = url
    return safe


def reveal(url: str) -> str:
    """The URL with its credentials when this process was given them (`remember`), else `url` itself."""
    return _real.get(url, url)
