"""The Cloud Functions' int params and the range each must be in, checked where the functions load and by `make
dev` before it hands them to the emulated functions.

The Functions SDK reads an int param with `int(os.environ[name])` at each use and checks nothing (nor does the
Firebase CLI check a `.env` value at deploy): an audit's `USER_MAX_PENDING=abc` deployed, then every callable
answered INTERNAL and every trigger crashed; `MAX_DISPATCHES=0` failed every queued job at the first sweep;
`RUNPOD_TIMEOUT_SECONDS=0` raised past the client's retries; a worker's `PLACEHOLDER_GRACE_SECONDS=2.5` crashed
every trigger call. Checked once when the functions load (a deploy's discovery, each cold start), a wrong value
fails the deploy with one line that names it, as `RETENTION_DAYS` does. A value typed at the deploy's prompt comes
after the discovery: the prompt itself holds it to the range (`range_pattern`, which the CLI's prompt retries on).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .contract import MAX_PLACEHOLDER_GRACE_SECONDS
from .quota import MAX_COUNT_LIMIT, MAX_DAILY_BUDGET
from .redaction import got

# name: (lowest, highest), whole numbers
INT_PARAMS: dict[str, tuple[int, int]] = {
    "RUNPOD_ATTEMPTS": (1, 10),
    # No attempt starts past the client's 50 s deadline, and each reads at most until it (a second at least) after
    # its 5 s to connect, which keeps a call within the callable's 70 s timeout.
    "RUNPOD_TIMEOUT_SECONDS": (1, 50),
    "REDISPATCH_AFTER_MINUTES": (1, 24 * 60),
    "MAX_DISPATCHES": (1, 100),
    "USER_MAX_RUNNING": (1, MAX_COUNT_LIMIT),
    "USER_MAX_PENDING": (1, MAX_COUNT_LIMIT),
    # Whole GPU-seconds: the SDK's float param is private, so the functions cannot take the worker's 30.5.
    "USER_DAILY_BUDGET": (1, MAX_DAILY_BUDGET),
    "PLACEHOLDER_GRACE_SECONDS": (0, MAX_PLACEHOLDER_GRACE_SECONDS),
}


def range_pattern(low: int, high: int) -> str:
    """A regular expression (Python's and JavaScript's) of the whole numbers from `low` (0 or 1) to `high`, written
    without leading zeros."""
    if low not in (0, 1) or high < 1:
        raise ValueError(f"no pattern for {low} to {high}")
    top = str(high)
    shorter = [f"[1-9][0-9]{{{digits - 1}}}" for digits in range(1, len(top))]
    # As long as `high`: its first i digits, then a smaller one, then any.
    below = [
        f"{top[:i]}[{int(i == 0)}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}"
        for i, digit in enumerate(top)
        if int(digit) > int(i == 0)
    ]
    return "^(" + "|".join(["0"] * (low == 0) + shorter + below + [top]) + ")$"


def whole_numbers(environ: Mapping[str, str], names: tuple[str, ...] = tuple(INT_PARAMS)) -> dict[str, int]:
    """The params of `names` set in `environ` to something other than blanks, as ints. ValueError naming the first
    that is no whole number within its range."""
    values = {}
    for name in names:
        raw = environ.get(name)
        if raw is None or not raw.strip():
            continue
        low, high = INT_PARAMS[name]
        # Digits alone: int() would also take "+5", "1_000" and other scripts' digits, which a worker refuses.
        if not (re.fullmatch(r"[0-9]+", raw.strip()) and low <= int(raw) <= high):
            raise ValueError(f"{name} must be a whole number from {low} to {high} {got(raw)}")
        values[name] = int(raw)
    return values
