"""Keep credentials out of everything a person or a log can read.

URIs may carry secrets (``s3://KEY:SECRET@bucket``, ``https://user:token@host``,
``?X-Amz-Signature=...``). Anything that leaves the process -- log lines, error
messages, MLflow params and tags, Prefect artifacts -- goes through ``redact``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_WORDS = ("secret", "token", "password", "passwd", "signature", "credential", "session", "key")
# userinfo is "token@" or "user:secret@"; a secret may itself hold "/" (AWS secret keys often do)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s:]+:[^@\s]*|[^/@\s:]+)@")
_MASK = "***"
_SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&\s]*(?:" + "|".join(_SECRET_WORDS) + r")[^=&\s]*=)[^&\s]+", re.I)


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_uri(uri: str) -> str:
    """Drop userinfo and secret-looking query parameters from a URI."""
    if "://" not in uri:
        return uri
    parts = urlsplit(_USERINFO.sub(lambda m: m.group("scheme"), uri, count=1))
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = urlencode(
        [(k, _MASK if _is_secret_name(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def has_credentials(uri: str) -> bool:
    """Whether a URI carries userinfo ("KEY:SECRET@", "token@") or a secret-looking query parameter.

    Stricter than a look at ``urlsplit(uri).netloc``: a secret holding "/" ends the netloc early
    ("s3://KEY:abc/def@bucket" parses as host "KEY:abc"), and the rest would pass for a path.
    """
    return "://" in uri and bool(_USERINFO.search(uri) or _SECRET_QUERY.search(uri))


def environment_secrets() -> list[str]:
    """Values of secret-looking environment variables (AWS keys, tokens), to scrub from free text."""
    return [
        value
        for name, value in _environment()
        if _is_secret_name(name) and len(value) >= 6 and not name.startswith(("PALM_RLHF_", "PYTEST"))
    ]


def _environment() -> list[tuple[str, str]]:
    """The environment's items. Another thread may unset a variable while they are read (MLflow's telemetry thread
    does), and os.environ.items() then raises KeyError for it: read again."""
    while True:
        try:
            return list(os.environ.items())
        except KeyError:
            continue


def redact(text: str) -> str:
    """Scrub credentials from free text: URI userinfo and any secret environment value."""
    text = _USERINFO.sub(lambda m: m.group("scheme"), text)
    text = _SECRET_QUERY.sub(lambda m: m.group("name") + _MASK, text)
    for value in environment_secrets():
        text = text.replace(value, _MASK)
    return text
