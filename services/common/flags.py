"""Command-line flags that can also come from `KVPACK_<FLAG>` environment variables.

`--metrics-port` reads `KVPACK_METRICS_PORT`, `--backend` reads `KVPACK_BACKEND`, and so on; a flag
given on the command line wins over the environment. Compose files configure services this way.
"""

from __future__ import annotations

import argparse
import os

ENV_PREFIX = "KVPACK_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Point every long option of `parser` (and its subparsers) at its environment variable."""
    for action in parser._actions:  # argparse has no public iterator over actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub)
            continue
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.dest == "help":
            continue
        name = env_name(long_options[0])
        action.help = (action.help or "") + f" [env {name}]"
        raw = os.environ.get(name)
        if raw is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            lowered = raw.strip().lower()
            if lowered not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")
            action.default = (lowered in _TRUE) == isinstance(action, argparse._StoreTrueAction)
        else:
            try:
                action.default = action.type(raw) if callable(action.type) else raw
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{name}={raw!r}: {error}")
        action.required = False


def host_port(value: str) -> str:
    """argparse type for HOST:PORT addresses."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return number


def positive_int(value: str) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return number
