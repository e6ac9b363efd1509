"""The webhook's log lines: one JSON object per line (pure).

Every line has ``time`` (UTC, milliseconds), ``level``, ``logger`` and ``message``, then its
fields. A decision's line is built here in one piece, because one is written per admission
review and the logging module's record, handler and formatter would cost more than the rest of
answering a review whose decision is cached.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

# Built once: json.dumps with options builds an encoder per call.
LOG_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))

_last_stamp: tuple[int, str] = (-1, "")


def log_time(created: float) -> str:
    """``created`` (Unix time) as ISO 8601 UTC with milliseconds; the text of the last
    millisecond is kept, as many lines share one."""
    global _last_stamp
    millisecond = int(created * 1000)
    if millisecond != _last_stamp[0]:
        text = datetime.datetime.fromtimestamp(millisecond / 1000, datetime.UTC).isoformat(
            timespec="milliseconds"
        )
        _last_stamp = (millisecond, text)
    return _last_stamp[1]


def json_line(entry: dict[str, Any], members: str = "") -> str:
    """``entry`` as one line of JSON, with ``members`` (serialised already, as
    ``"a":1,"b":2``) added at the end."""
    line = LOG_ENCODER.encode(entry)
    if members:
        line = f"{line[:-1]},{members}}}"
    return line
