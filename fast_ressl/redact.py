"""Keep secrets out of config dumps, logs, summaries and checkpoints.

Two sources of secrets are recognised: values of environment variables with secret-looking names
(TOKEN, SECRET, PASSWORD, API_KEY, ...) that appear anywhere in a string we write, and passwords in
URLs (`scheme://user:password@host`). Both are replaced by `***`.
"""
from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(?i)(secret|token|passw(or)?d|api_?key|access_?key|private_?key|credential|auth)")
URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^@\s/]+)(?P<tail>@)")
MASK = "***"
MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary text


def secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """`values`: the secret values to mask (default: read from the environment now)."""
    for value in secret_values() if values is None else values:
        text = text.replace(value, MASK)
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)


def redact_obj(obj: Any) -> Any:
    """Recursively redact every string in dicts/lists/tuples; keys whose names look secret are masked."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str) and v
                    else redact_obj(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj
