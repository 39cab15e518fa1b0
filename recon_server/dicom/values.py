"""DICOM attribute values within their value representation's rules.

Text (LO, SH, CS, PN, ST, LT) is cleaned of control and bidirectional characters and cut to the
VR's length in bytes of the datasets' character set (ISO_IR 192, UTF-8), never inside a
character; numbers are decimal strings (DS) of at most 16 characters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
from pydicom.valuerep import format_number_as_ds

log = logging.getLogger(__name__)

#: The datasets' SpecificCharacterSet and its Python codec: VR length limits count bytes in it.
CHARACTER_SET, ENCODING = "ISO_IR 192", "utf-8"
#: Bidirectional controls: they reorder what a viewer displays (a name or description could be
#: shown as something else); removed from every string written.
BIDI_CONTROLS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def nbytes(text: str) -> int:
    return len(text.encode(ENCODING))


def fit_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes in :data:`ENCODING`, at a character boundary."""
    raw = text.encode(ENCODING)
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(ENCODING, errors="ignore")  # drops only the cut character's bytes


def clean_text(value: object, limit: int, what: str) -> str:
    """LO/SH/CS text: no backslash, control or bidi characters, at most ``limit`` bytes in the
    dataset's character set (ISO_IR 192: UTF-8), never cut inside a character."""
    if value is None:
        return ""
    text = BIDI_CONTROLS.sub("", _CONTROLS.sub(" ", str(value))).strip()
    if nbytes(text) > limit:
        log.warning("%s truncated to %d bytes: %r", what, limit, text)
        text = fit_bytes(text, limit).rstrip()
    return text


def person_name(value: str | None, what: str) -> str:
    """PN: at most 5 ``^`` components and 64 characters; the longest components are shortened.

    Keeping the carets keeps family and given names apart (dciodvfy flags a caret-less long
    name as the retired PN form).
    """
    if not value:
        return ""
    text = BIDI_CONTROLS.sub("", re.sub(r"[\x00-\x1f\x7f-\x9f\\=]", " ", value)).strip()
    parts = [p.strip() for p in text.split("^")][:5]
    while nbytes("^".join(parts)) > 64:  # 64 bytes in the character set, as for clean_text
        longest = max(range(len(parts)), key=lambda k: nbytes(parts[k]))
        excess = nbytes("^".join(parts)) - 64
        parts[longest] = fit_bytes(parts[longest], max(0, nbytes(parts[longest]) - excess)).rstrip()
        if not parts[longest] and nbytes("^".join(parts)) > 64:
            parts.pop(longest)  # pathological: many short components
    name = "^".join(parts).rstrip("^")
    if name != text:
        log.warning("%s sanitised to DICOM PN limits: %r -> %r", what, text, name)
    return name


def code_string(value: str) -> str:
    """CS: upper case letters, digits, space and underscore, at most 16 characters."""
    return re.sub(r"[^A-Z0-9 _]", "_", value.upper())[:16].strip()


def decimal_string(value: float) -> str:
    return format_number_as_ds(float(value))


def decimal_strings(values: Sequence[float] | np.ndarray) -> list[str]:
    return [decimal_string(v) for v in values]
