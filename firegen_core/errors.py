"""The contract's error types, and the one place that maps a raised exception onto them.

Messages are short and human: never a stack trace, a path to a secret or a token. Pure: no torch import here,
so the mapping works in processes that never load a model (the Cloud Function, the job store).
"""

from __future__ import annotations

import re

from .contract import MAX_MESSAGE_CHARS as MAX_MESSAGE_CHARS  # re-exported: the limit lives with ContractError
from .contract import ContractError, clip

MODEL_NOT_AVAILABLE = "ModelNotAvailable"
OUT_OF_MEMORY = "OutOfMemoryError"
RUNTIME_ERROR = "RuntimeError"
CONNECTION_ERROR = "ConnectionError"
EXCEPTION = "Exception"
# Beyond the contract's list: a job document whose parameters break the contract (a runsync call is refused
# before any doc exists, so only client-written docs end this way). None of the five fits it.
VALIDATION_ERROR = "ValidationError"
# A job refused without being generated: past one of the user's limits (USER_MAX_PENDING, USER_DAILY_BUDGET).
QUOTA_EXCEEDED = "QuotaExceeded"
# A job its owner cancelled, and one that ran past its time limit (the scheduling part of the queue).
CANCELLED = "Cancelled"
TIMEOUT = "Timeout"
ERROR_TYPES = (
    MODEL_NOT_AVAILABLE,
    OUT_OF_MEMORY,
    RUNTIME_ERROR,
    CONNECTION_ERROR,
    EXCEPTION,
    VALIDATION_ERROR,
    QUOTA_EXCEEDED,
    CANCELLED,
    TIMEOUT,
)
CANCELLED_MESSAGE = "Cancelled by the user"
# A runsync that arrives for a job its owner deleted (firegen_core.deletion): answered so, and not run again.
DELETED_MESSAGE = "Generation deleted by its owner"
# A runsync's answer when the worker could not write the job's doc (Firestore away): a transient failure of the
# worker, which the functions tell from a verdict on the request by this prefix.
NOT_RECORDED_PREFIX = "Could not record the job"
NOT_RECORDED = f"{NOT_RECORDED_PREFIX} in Firestore; please retry (the same file_uid is safe to resend)"
# What a job's failure says to whoever runs the worker, as a log level: a client's doing (its parameters, its
# limits, its cancel) is news; a job past its time limit, a warning; the rest (the GPU, the network, a bug) an
# error, which is what an operator's alert watches.
CLIENTS_DOING = frozenset({VALIDATION_ERROR, QUOTA_EXCEEDED, CANCELLED})


def failure_level(error_type: object) -> str:
    """The log level of a job that failed with `error_type`: "info", "warning" or "error"."""
    if error_type in CLIENTS_DOING:
        return "info"
    return "warning" if error_type == TIMEOUT else "error"


class GenerationError(Exception):
    """A job failure with the contract's `error_type` and a message fit for the client."""

    def __init__(self, error_type: str, message: str):
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}")
        message = clip(message)
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class ModelNotAvailable(GenerationError):
    def __init__(self, message: str):
        super().__init__(MODEL_NOT_AVAILABLE, message)


class Interrupted(BaseException):
    """Raised from a progress callback to stop a generation (lease lost, shutdown, cancel, deadline).

    A BaseException so that no `except Exception` on the way (ours or a library's) turns it into a failure:
    the runner decides what an interrupted job writes, from why it stopped.
    """


# A URL's query in a library's message (`...?X-Goog-Signature=...`, `?token=...`): a signed URL's signature or a
# download token, which a job's `error_message` and the logs must never carry.
_QUERY = re.compile(r"\?[^\s'\"()]*=[^\s'\"()]*")


def _short(exc: BaseException) -> str:
    return clip(_QUERY.sub("?<query removed>", " ".join(str(exc).split())) or type(exc).__name__)


# torch's CPU allocator says "can't allocate memory" (a CPU-only dev run with a big job), CUDA "out of memory", and
# cuBLAS, creating its handle or workspace on a full card, CUBLAS_STATUS_ALLOC_FAILED (the GPU-waste review: read as
# a broken device, the worker left and the job ran again elsewhere from its start, never tried leaner).
_OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and any(marker in text for marker in _OUT_OF_MEMORY_MARKERS)


def classify(exc: BaseException, *, during: str = "generation") -> GenerationError:
    """Map any exception raised while running a job onto the contract's error types."""
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, ContractError):
        return GenerationError(VALIDATION_ERROR, exc.message)
    if is_out_of_memory(exc) or isinstance(exc, MemoryError):
        # The contract's own example names the GPU's memory: "CUDA Out of Memory during image generation".
        ran_out = "CUDA Out of Memory" if "cuda" in str(exc).lower() else "Out of memory"
        return GenerationError(OUT_OF_MEMORY, f"{ran_out} during {during}")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(
        ("google.api_core", "google.auth", "requests", "urllib3")
    ):
        return GenerationError(CONNECTION_ERROR, f"Upload or storage failure: {_short(exc)}")
    if isinstance(exc, (RuntimeError, ValueError, IndexError)):
        return GenerationError(RUNTIME_ERROR, f"Processing error during {during}: {_short(exc)}")
    return GenerationError(EXCEPTION, f"Unexpected error during {during}: {_short(exc)}")
