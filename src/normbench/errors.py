"""Errors a user can cause. Each renders as one line naming the key, the value and the fix."""

from __future__ import annotations


class NormbenchError(Exception):
    """Base class: the entry points print str(error) on one line and exit non-zero, no traceback."""


class ConfigError(NormbenchError):
    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"bad value {key}={value!r}: {allowed}")


class DataNotFoundError(NormbenchError):
    pass


class StorageError(NormbenchError):
    pass
