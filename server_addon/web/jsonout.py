"""JSON in and out of the web interface, always valid JSON: no NaN, Infinity or -Infinity either way.

Python's json writes NaN and Infinity by default, which no browser parses. The protocol refuses such numbers
from the network, so none should reach the farm's state; should one slip through anyway (an old database, a
bug), the response replaces it by null and the server logs where it was, once per place. Null rather than a
500: the status is one document for the whole farm, and one bad number must not blind the page and every
tool to all the other jobs; null is what the page already shows as "not known" (an ETA before the first frame).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

#: Places (key paths) already logged, so a bad value in a status rebuilt on every change is logged once.
_LOGGED: set[str] = set()
_MAX_LOGGED = 100


def dumps(data: Any, **options: Any) -> str:
    """json.dumps that never writes NaN or an infinity (see the module's doc)."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError:
        places: list[str] = []
        clean = _finite(data, "$", places)
        for place in places:
            if place not in _LOGGED and len(_LOGGED) < _MAX_LOGGED:
                _LOGGED.add(place)
                log.warning("web: a number that is not finite at %s was sent as null", place)
        return json.dumps(clean, allow_nan=False, **options)


def json_response(data: Any, **kwargs: Any) -> web.Response:
    return web.json_response(data, dumps=dumps, **kwargs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this interface accepts")


def loads(data: bytes | str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (ValueError), which Python's accepts."""
    return json.loads(data, parse_constant=_refuse_constant)


def _finite(value: Any, place: str, places: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        places.append(place)
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{place}.{key}", places) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item, f"{place}[{index}]", places) for index, item in enumerate(value)]
    return value
