"""Errors a user can cause. Each renders as one line naming the key, the value and the fix."""

from __future__ import annotations

import re


class NormbenchError(Exception):
    """Base class: the entry points print str(error) on one line and exit non-zero, no traceback."""


class ConfigError(NormbenchError):
    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"bad value {key}={value!r}: {allowed}")


def unknown_key(key: str, value: object, accepted, why: str, tail: str | None = None) -> ConfigError:
    """A key nothing reads: `why`, the closest accepted key (difflib) and `tail` (default: the accepted
    keys)."""
    import difflib

    group, _, name = key.rpartition(".")
    accepted = sorted(accepted)
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {group}.{close[0]}? " if close else ""
    if tail is None:
        tail = "accepted: " + (", ".join(accepted) if len(accepted) <= 12 else ", ".join(accepted[:12]) + ", ...")
    return ConfigError(key, value, f"{why}; {hint}{tail}")


class DataNotFoundError(NormbenchError):
    pass


class StorageError(NormbenchError):
    pass


MASK = "***"
# user:password@ in any URL, and password=... in a query string or key=value list
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)(?P<secret>[^\s'\"/]+)(?=@)")
_KEY_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)=)(?P<secret>[^\s&'\",\]]+)", re.IGNORECASE)


def mask_passwords(text: str) -> str:
    """`text` with every URL password (`scheme://user:***@host`) and `password=***` masked: for text that
    is printed before anything could parse it (the command line, a parse error quoting it)."""
    for pattern in (_URL_PASSWORD, _KEY_PASSWORD):
        text = pattern.sub(lambda m: m["head"] + MASK, text)
    return text
