"""Errors a user can cause. Each renders as one line naming the key, the value and the fix."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import NoReturn

PREFIX = "normbench: "   # every line normbench itself prints to stderr starts so


class NormbenchError(Exception):
    """Base class: the entry points print str(error) on one line and exit non-zero, no traceback."""


class ConfigError(NormbenchError):
    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"bad value {key}={value!r}: {allowed}")

    def __reduce__(self):  # a sweep job's error crosses process boundaries (joblib, submitit) pickled
        return type(self), (self.key, self.value, self.allowed)


def unknown_key(key: str, value: object, accepted, why: str, tail: str | None = None) -> ConfigError:
    """A key nothing reads: `why`, the closest accepted key and `tail` (default: the accepted keys)."""
    import difflib

    group, _, name = key.rpartition(".")
    accepted = sorted(accepted)
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {group + '.' if group else ''}{close[0]}? " if close else ""
    if tail is None:
        tail = "accepted: " + ", ".join(accepted[:12]) + (", ..." if len(accepted) > 12 else "")
    return ConfigError(key, value, f"{why}; {hint}{tail}")


class DataNotFoundError(NormbenchError):
    pass


class StorageError(NormbenchError):
    pass


MASK = "***"
PASSWORD_KEYS = ("password", "passwd", "pwd")  # key=value and URL query keys that carry a password
# user:password@ in any URL, and password=... in a query string or key=value list
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)(?P<secret>[^\s'\"/]+)(?=@)")
_KEY_PASSWORD = re.compile(rf"(?P<head>\b(?:{'|'.join(PASSWORD_KEYS)})=)(?P<secret>[^\s&'\",\]]+)",
                           re.IGNORECASE)


def mask_passwords(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets` (known passwords), every URL password and every `password=...` masked."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern in (_URL_PASSWORD, _KEY_PASSWORD):
        text = pattern.sub(lambda m: m["head"] + MASK, text)
    return text


def one_line(err: BaseException, typed: bool = True) -> str:
    """The first line of its message (of the driver's own error for SQLAlchemy's, which adds the statement
    and a link) and its notes, after its type when `typed`."""
    orig = getattr(err, "orig", None) or err
    first = next((line.strip() for line in str(orig).splitlines() if line.strip()), "")
    first = " ".join([first, *getattr(err, "__notes__", ())]).strip()
    if not typed:
        return first or type(orig).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def fail(message: object, status: int = 2) -> NoReturn:
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    sys.exit(status)


def warn(message: str) -> None:
    print(f"{PREFIX}warning: {message}", file=sys.stderr, flush=True)
