"""Checks made before Hydra creates any dir or launches any job (docs/training.md, "Bad input")."""

from __future__ import annotations

import contextlib
import io
import os
import sys

from omegaconf import DictConfig, OmegaConf

from normbench.errors import ConfigError, fail, mask_passwords, one_line

# what each parallelism key counts (an integer >= 1; joblib's n_jobs also takes -1..-cores)
PARALLEL_KEYS = {"hydra.launcher.n_jobs": "jobs at a time",
                 "hydra.sweeper.n_jobs": "trials launched at a time",
                 "hydra.launcher.max_fuse": "runs trained as one fused model"}
NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows filesystems


class MaskingStream(io.TextIOBase):
    """A text stream that writes to `stream` with passwords masked (io.TextIOBase adds writelines, closed,
    the context manager; closing it leaves `stream` open)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask_passwords(text))
        return len(text)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def flush(self) -> None:
        self._stream.flush()

    encoding = property(lambda self: self._stream.encoding)
    errors = property(lambda self: self._stream.errors)


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of a bench/train.py command line, as Hydra's own argument parser splits it."""
    from hydra._internal.utils import get_args_parser

    try:  # silently: --help, --version or a bad flag are Hydra's to print
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_intermixed_args(argv)
    except SystemExit:
        return []
    return list(args.overrides or [])


def preset_spelling(argv: list[str]) -> list[str]:
    """`+experiment=NAME` as `experiment=NAME`: conf/config.yaml lists the experiment group (so that
    `experiment=NAME` works), and Hydra refuses to append (+) a group the defaults list already names."""
    return [arg[1:] if arg.startswith("+experiment=") else arg for arg in argv]


def check_command_line(argv: list[str]) -> None:
    """Exit with one line (status 2) when an override cannot be parsed; mask passwords from here on."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(mask_passwords(arg) != arg for arg in argv):
        sys.stdout, sys.stderr = MaskingStream(sys.stdout), MaskingStream(sys.stderr)
    parser = OverridesParser.create()
    for override in _overrides(argv[1:]):
        try:
            parser.parse_override(override)
        except HydraException as err:  # parse_override raises the base class, parse_overrides the subclass
            reason = one_line(err, typed=False)
            fail(mask_passwords(f"cannot parse the override {override!r}: {reason}; quote a "
                                "value with special characters, e.g. 'key=\"a value\"' (grammar: "
                                "https://hydra.cc/docs/advanced/override_grammar/basic/)"))


def check_experiment_name(name) -> None:
    """experiment_name names a dir (outputs/<name>, multirun/<name>) and a W&B group: one path component."""
    ok = isinstance(name, str) and name.strip() and name not in (".", "..") and os.sep not in name \
        and "/" not in name and "\\" not in name and "\0" not in name and name == name.strip()
    if not ok:
        raise ConfigError("experiment_name", name, "must be one dir name (no '/', not '.' or '..', not "
                                                   "empty), e.g. experiment_name=bn_vs_gn")
    if len(name.encode()) > NAME_MAX:
        raise ConfigError("experiment_name", name, f"is {len(name.encode())} bytes long: at most "
                                                   f"{NAME_MAX}, since it becomes a dir name, e.g. "
                                                   "experiment_name=bn_vs_gn")


def check_launch(config: DictConfig) -> None:
    """The parallelism a launcher or sweeper is given: an integer >= 1 (joblib also takes -1: every core)."""
    for key, counted in PARALLEL_KEYS.items():
        value = OmegaConf.select(config, key, default=None)
        if value is None:
            continue
        cores = os.cpu_count() or 1
        joblib_style = key == "hydra.launcher.n_jobs"
        ok = isinstance(value, int) and not isinstance(value, bool) and (
            value >= 1 or (joblib_style and -cores <= value <= -1))
        if not ok:
            allowed = (f"{counted}: an integer >= 1"
                       + (f", or -1 for one per core (-{cores}..-1: all but n-1 cores)" if joblib_style
                          else ""))
            raise ConfigError(key, value, f"must be the number of {allowed}, e.g. {key}=2")

