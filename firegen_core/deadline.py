"""How long a job may run: a multiple of its estimated GPU time, never under a floor. Pure.

deadline = max(floor, multiple x estimate)

The estimate is the per-user cost model of `firegen_core.quota` (measured H100 figures, README "Per-user limits"):
one cost model serves both the budget and the deadline. It is a rough figure (a few measured sizes, attention's
square counted for large videos alone): the multiple (default 5) covers slower cards and that error, the floor (default
120 s) covers loading and small jobs. On cards much slower than an H100 (L4, A10) raise JOB_TIMEOUT_MULTIPLE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .contract import GenerationRequest
from .quota import estimate as estimated_seconds

DEFAULT_FLOOR_SECONDS = 120.0
DEFAULT_MULTIPLE = 5.0


@dataclass(frozen=True)
class Deadline:
    """JOB_TIMEOUT_FLOOR_SECONDS and JOB_TIMEOUT_MULTIPLE."""

    floor_seconds: float = DEFAULT_FLOOR_SECONDS
    multiple: float = DEFAULT_MULTIPLE

    def __post_init__(self) -> None:
        if self.floor_seconds <= 0 or self.multiple <= 0:
            raise ValueError(f"invalid {self!r}")

    def seconds(self, request: GenerationRequest | None) -> float:
        """The time a job may run, from its claim to its last write; the floor when its request is unknown."""
        return self.seconds_for([] if request is None else [request])

    def seconds_for(self, requests: Sequence[GenerationRequest]) -> float:
        """The time jobs that run together (one batch) may run: the deadline of their summed estimates."""
        return max(self.floor_seconds, self.multiple * sum(estimated_seconds(request) for request in requests))


def timeout_message(seconds: float) -> str:
    return f"Generation stopped: it ran past its time limit of {round(seconds, 1):g} s"
