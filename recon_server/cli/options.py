"""Bounded option types for the ``recon-server`` subcommands (argparse ``type=`` callables), the
help formatter they share and the method names the help lists.

Nothing here imports torch: building the parser must stay fast (``pacs-echo`` on a scanner).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from recon_server.service.config import MAX_POSTERIOR_SAMPLES

#: The reconstruction methods (the keys of ``recon_server.recon.methods.METHODS``, which imports
#: torch; a unit test keeps the two equal).
METHOD_NAMES = ("zero-filled", "cg-sense", "l1-wavelet", "dps", "dps-fast", "dps-warm")
#: For help texts: "one of zero-filled, cg-sense, ...".
METHOD_LIST = ", ".join(METHOD_NAMES)
#: ``recon_server.dpm.precision.CPU_PRECISIONS`` (that module imports torch; a unit test keeps
#: the two equal).
CPU_PRECISIONS = ("auto", "fp32", "bf16", "fp32-cl", "bf16-cl")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` only where X is a real default.

    Left out for None (the default comes from elsewhere: the help text says which), empty
    lists, False (``store_true`` flags), and where the help text already names its default.
    Lists are shown as typed (``2,4,5,6``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default: Any = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, list | tuple) and not default)
            or "default" in text
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return action.help
        if isinstance(default, list | tuple):
            default = ",".join(str(v) for v in default)
        shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port, where listening)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def posterior_samples(text: str) -> int:
    """Posterior samples of a diffusion method, 1..MAX_POSTERIOR_SAMPLES."""
    value = int(text)
    if not 1 <= value <= MAX_POSTERIOR_SAMPLES:
        raise argparse.ArgumentTypeError(f"samples must be in 1..{MAX_POSTERIOR_SAMPLES}, got {value}")
    return value


def byte_size(text: str) -> int:
    """Bytes: an integer, or with a K / M / G / T suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(body[-1:], 1)
    try:
        value = int(float(body[:-1] if scale > 1 else body) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 4G or 4294967296, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def contrast_method(text: str) -> tuple[str, str]:
    """``CONTRAST=METHOD`` -> (upper-case contrast label, method)."""
    contrast, sep, method = text.partition("=")
    if not sep or not contrast or not method:
        raise argparse.ArgumentTypeError(f"expected CONTRAST=METHOD, got {text!r}")
    return contrast.strip().upper(), method.strip()


def int_list(text: str) -> list[int]:
    """``2,4,6`` -> [2, 4, 6], each >= 1."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """``0.3,1,3`` -> [0.3, 1.0, 3.0], each > 0."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def str_list(text: str) -> list[str]:
    """``a, b`` -> ["a", "b"], not empty."""
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def method_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["dps.steps=100", "dps-fast.eta=0.5"]`` -> ``{"dps": {"steps": 100}, "dps-fast": {"eta": 0.5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"--set takes METHOD.SETTING=VALUE, got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare word, e.g. dps.solver=heun
        out.setdefault(method, {})[name] = parsed
    return out


def add_sampler_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set METHOD.SETTING=VALUE`` (repeatable, parsed by :func:`method_overrides`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="METHOD.SETTING=VALUE",
        help="sampler setting beating the model card, e.g. dps.steps=100 (repeatable)",
    )
