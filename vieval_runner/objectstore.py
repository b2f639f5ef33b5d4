"""Object-storage settings shared by the store (delta-rs) and remote checkpoints (obstore).

One flat dict of options, spelled as delta-rs takes them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``allow_http``, ``max_retries`` ...), configures both clients: delta-rs
takes it as is, and :func:`obstore_options` sorts it into obstore's config, client and retry
settings. Keys left out fall back to the standard environment variables (``AWS_*``,
``GOOGLE_*``, ``AZURE_*``), which both libraries read themselves. Secrets never leave this
process: :func:`redact_options` for anything written, :func:`scrub` for error messages.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure")

# Values that are safe to show (everything else is redacted): where, not who.
_PUBLIC = {
    "endpoint",
    "endpoint_url",
    "region",
    "default_region",
    "bucket",
    "bucket_name",
    "allow_http",
    "conditional_put",
    "virtual_hosted_style_request",
    "max_retries",
    "retry_timeout",
    "timeout",
    "connect_timeout",
    "project_id",
    "account_name",
    "container_name",
    "use_emulator",
}

# object_store's HTTP client settings (obstore takes them apart from the service's config).
_CLIENT = {
    "allow_http",
    "allow_invalid_certificates",
    "connect_timeout",
    "default_content_type",
    "http1_only",
    "http2_keep_alive_interval",
    "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle",
    "http2_only",
    "pool_idle_timeout",
    "pool_max_idle_per_host",
    "proxy_url",
    "proxy_ca_certificate",
    "proxy_excludes",
    "timeout",
    "user_agent",
}
# delta-rs's own commit settings: meaningless to a plain object-store client.
_DELTA_ONLY = {"s3_locking_provider", "dynamo_table_name", "delta_dynamo_table_name"}
_UNSAFE_RENAME = "s3_allow_unsafe_rename"
_SERVICE_PREFIX = {"s3": "aws_", "s3a": "aws_", "gs": "google_", "gcs": "google_"}


class StorageOptionsError(ValueError):
    """Object-storage options that cannot be used (the message names the key)."""


def is_remote(uri: str | object) -> bool:
    """True for an object-store URL (``s3://``, ``gs://``, ``az://`` ...), False for a path."""
    scheme, sep, _ = str(uri).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def _base(key: str) -> str:
    k = key.lower()
    for prefix in ("aws_", "google_", "azure_"):
        if k.startswith(prefix):
            return k[len(prefix) :]
    return k


def check_options(options: Mapping[str, str] | None) -> dict[str, str] | None:
    """The options as strings; refuses delta-rs's unsafe-rename mode, which loses commits
    when several writers share a table (conditional put is the safe default)."""
    if not options:
        return None
    out = {str(k): str(v) for k, v in options.items()}
    for key, value in out.items():
        if _base(key) == _UNSAFE_RENAME and value.strip().lower() in ("true", "1", "yes"):
            raise StorageOptionsError(
                f"storage option {key}=true is refused: unsafe renames lose commits when "
                "several processes write one store; delta-rs commits with conditional put "
                "without it"
            )
    return out


def redact_options(options: Mapping[str, str] | None) -> dict[str, str]:
    """The options with every value that may be a secret replaced by ``"***"``."""
    return {k: (str(v) if _base(k) in _PUBLIC else "***") for k, v in (options or {}).items()}


def secret_values(options: Mapping[str, str] | None) -> list[str]:
    """The option values that :func:`redact_options` hides (to scrub from messages)."""
    return [
        str(v) for k, v in (options or {}).items() if _base(k) not in _PUBLIC and len(str(v)) > 3
    ]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def scrub(text: str, options: Mapping[str, str] | None = None) -> str:
    """``text`` without terminal colours and without any secret option value."""
    text = _ANSI.sub("", text)
    for secret in secret_values(options):
        text = text.replace(secret, "***")
    return text


def explain(exc: BaseException, url: str, options: Mapping[str, str] | None = None) -> str:
    """One line that says what went wrong with ``url`` (never a secret)."""
    raw = scrub(str(exc), options)
    flat = " ".join(part.strip(" ↳") for part in raw.splitlines() if part.strip())
    codes = (
        ("NoSuchBucket", "the bucket does not exist"),
        ("SignatureDoesNotMatch", "access denied: wrong secret key"),
        ("InvalidAccessKeyId", "access denied: unknown access key"),
        ("AccessDenied", "access denied"),
        ("403 Forbidden", "access denied (HTTP 403): check the credentials"),
        ("lacked the necessary privileges", "access denied: check the credentials"),
        ("tcp connect", "cannot reach the endpoint"),
        ("error sending request", "cannot reach the endpoint"),
        ("timed out", "the object store timed out"),
    )
    reason = next((why for code, why in codes if code in flat), None)
    detail = flat if len(flat) < 400 else flat[:400] + " ..."
    return f"{url}: {reason} ({detail})" if reason else f"{url}: {detail}"


def _duration(text: str, key: str) -> dt.timedelta:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise StorageOptionsError(f"storage option {key}={text!r}: expected a duration like 5s")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    return dt.timedelta(seconds=float(m.group(1)) * scale)


def obstore_options(url: str, options: Mapping[str, str] | None) -> dict:
    """Keyword arguments for ``obstore.store.from_url(url, **kw)`` from delta-rs-style options."""
    scheme = str(url).partition("://")[0].lower()
    prefix = _SERVICE_PREFIX.get(scheme, "azure_")
    config: dict[str, str] = {}
    client: dict[str, str] = {}
    retry: dict = {}
    for key, value in (check_options(options) or {}).items():
        base = _base(key)
        if base in _CLIENT:
            client[base] = value
        elif base == "max_retries":
            retry["max_retries"] = int(value)
        elif base == "retry_timeout":
            retry["retry_timeout"] = _duration(value, key)
        elif base in _DELTA_ONLY or base == _UNSAFE_RENAME:
            continue
        else:
            name = prefix + ("endpoint" if base == "endpoint_url" else base)
            config[name] = value
    kwargs: dict = {"config": config, "client_options": client}
    if retry:
        kwargs["retry_config"] = retry
    return kwargs


def open_prefix(url: str, options: Mapping[str, str] | None):
    """An obstore store rooted at ``url`` (bucket and prefix); paths are relative to it."""
    from obstore.store import from_url

    return from_url(str(url).rstrip("/") + "/", **obstore_options(url, options))
