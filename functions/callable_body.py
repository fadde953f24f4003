"""A callable's body the firebase_functions SDK cannot read, answered as the callable protocol's INVALID_ARGUMENT.

The SDK reads the body before any code of ours runs. A body that is not JSON, JSON that is no object (`5`,
`true`, `[]`), or JSON Python's parser refuses (an integer of 5,000 digits, arrays nested 5,000 deep) raised
inside it and came back HTTP 500 INTERNAL with an ERROR entry "Unhandled error": a caller's mistake told as the
operator's fault (runsync answers such bodies 400). The SDK still refuses every other malformed call itself (a
GET, no JSON content type, an object without `data` or with more): those it answers 400 already.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Request, Response, jsonify, make_response
from flask_cors import cross_origin

log = logging.getLogger("functions.callable_body")

MESSAGE = 'Bad Request: the body must be a JSON object {"data": ...}'


def readable(request: Request) -> bool:
    """False for a POST of JSON content whose body does not parse to a JSON object; True for all else."""
    if request.method != "POST" or not request.is_json:
        return True
    try:
        # Cached: the SDK reads the same bytes again.
        return isinstance(json.loads(request.get_data(cache=True)), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False


def guarded(endpoint: Callable[[Request], Any], origins: Any = "*") -> Callable[[Request], Any]:
    """`endpoint` (what `@https_fn.on_call` made) behind the check; `origins` as its CORS options give them (the
    SDK's default "*"), so that a browser reads the refusal instead of a CORS error."""

    @cross_origin(methods="POST", origins=origins)
    def refuse() -> Response:
        return make_response(jsonify(error={"status": "INVALID_ARGUMENT", "message": MESSAGE}), 400)

    @functools.wraps(endpoint)  # the SDK's endpoint attributes too: deploy's discovery reads them
    def call(request: Request) -> Any:
        if readable(request):
            return endpoint(request)
        log.warning("callable_body_unreadable", extra={"function": endpoint.__name__, "bytes": request.content_length})
        return refuse()

    return call
