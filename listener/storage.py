"""Upload a job's results to Cloud Storage and give back the URLs the job document carries.

Object names are deterministic per job (firegen_core.results: the names, and which of them a job owns), so a
retried job overwrites its objects and never adds more.

Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff,
bounded by a number of attempts and a total time (`RetryPolicy`). The library's own retry is switched off on the
upload's calls (the name check and the upload) so that budget is the only one; the clean-ups (deletes, the listing
of alternates: best effort, after a job's result is decided) keep the library's default. What still fails is raised as `StorageError` (a `ConnectionError`, so
firegen_core.errors.classify reports it as the contract's "ConnectionError"); `StorageUnavailable` when the
retry budget ran out. Messages name the object and the kind of failure, never a URL, token or signature.

URL styles (URL_STYLE, default `token`):
    public  https://storage.googleapis.com/{bucket}/{name}            (the contract's form; needs a bucket that
            anyone may read, and list: every user's results, bypassing storage.rules; warned about at start-up)
    signed  a V4 signed GET URL that expires (needs credentials that can sign: a service-account key, or
            credentials with `service_account_email` and the IAM signBlob permission)
    token   https://firebasestorage.googleapis.com/v0/b/{bucket}/o/{quoted name}?alt=media&token={uuid4}, the
            token stored in the object's `firebaseStorageDownloadTokens` metadata, as the Firebase SDKs do
Under a Storage emulator (emulator_host / STORAGE_EMULATOR_HOST) every style gives the emulator's media
download URL, `{emulator}/download/storage/v1/b/{bucket}/o/{quoted name}?alt=media` (plus `&token=...` for
`token`), so the result downloads locally; under the Firebase CLI's own (firebase_emulator_host /
FIREBASE_STORAGE_EMULATOR_HOST too), a token URL is Firebase's on it, `{emulator}/v0/b/{bucket}/o/{quoted
name}?alt=media&token=...`, as the JS SDK's getDownloadURL() gives there (its ref(storage, url) reads no other
form of the emulator's).
"""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, get_args
from urllib.parse import quote

import requests
import structlog
from google.api_core import exceptions as api_exceptions
from google.auth.exceptions import TransportError
from google.cloud.storage._signing import generate_signed_url_v4
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from tenacity import Retrying, retry_if_exception, wait_exponential_jitter

if TYPE_CHECKING:  # pragma: no cover
    from google.cloud import storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage

from firegen_core import results
from firegen_core.results import (
    ALTERNATE_MARK,
    DEFAULT_FORMAT,
    OWNER_METADATA_KEY,
    alternate_name,
    is_contested,
    most,
    object_name,
    owner,
)
from listener.settings import MAX_SIGNED_URL_SECONDS, Settings, UrlStyle

log = structlog.get_logger("listener.storage")
T = TypeVar("T")

URL_STYLES = get_args(UrlStyle)
TOKEN_METADATA_KEY = "firebaseStorageDownloadTokens"
# A token or signed URL's bytes never change: each upload has a new download token (a new URL), and signed URLs
# differ each time. So browsers may keep them: an app's job list does not fetch every image again. `private`:
# results are per user, never for shared caches.
CACHE_CONTROL = "private, max-age=31536000, immutable"
# A public URL is the object's name alone, which a job deleted and sent again under its file_uid writes anew (a
# year's `immutable` showed the deleted job's image): browsers keep the bytes but ask each time (a 304 while the
# object is unchanged).
PUBLIC_CACHE_CONTROL = "private, no-cache"
# When the try that wrote the object claimed its job (the claim's server time, microseconds since the epoch): a
# later claim's is greater, and a try never writes over a later try's object (`Superseded`).
CLAIM_METADATA_KEY = "firegen_claim"
UPLOAD_THREADS = 4  # a job's files uploaded at once (an image job has 4 at most)
PUBLIC_BASE = "https://storage.googleapis.com"
FIREBASE_BASE = "https://firebasestorage.googleapis.com"

TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class StorageError(ConnectionError):
    """An upload (or URL signing) failed. A ConnectionError, so classify() gives the contract's ConnectionError."""


class StorageUnavailable(StorageError):
    """Storage kept failing with transient errors until the retry budget ran out."""


def refused_access(exc: BaseException) -> bool:
    """Whether a failed upload was refused for want of access (HTTP 401/403: the worker's grant revoked, its key
    disabled, the bucket's policy rewritten while it ran): every later job's upload would be refused too."""
    cause = exc.__cause__ if isinstance(exc, StorageError) else None
    return isinstance(cause, api_exceptions.Unauthorized | api_exceptions.Forbidden)


class UploadStopped(Exception):
    """Its caller cut the upload short (`upload(until=...)`: the job cancelled, the worker leaving): nothing more
    is tried. `storage_away`: the last try had failed on a transient error (Storage away or slow)."""

    def __init__(self, message: str, *, storage_away: bool = False):
        super().__init__(message)
        self.storage_away = storage_away


@dataclass
class Window:
    """Until when a call's tries may run: its retry budget's `end` (time.monotonic()), or sooner where `until`
    says so (a time that may move: a cancel makes it now). A request's timeout is cut to what is left.
    `troubled`: a try within it failed on a transient error (Storage away or slow)."""

    end: float
    until: Callable[[], float] | None = None
    troubled: bool = False

    @classmethod
    def of(cls, seconds: float, until: Callable[[], float] | None = None) -> Window:
        return cls(time.monotonic() + seconds, until)

    def left(self) -> float:
        end = self.end if self.until is None else min(self.end, self.until())
        return end - time.monotonic()

    @property
    def cut(self) -> bool:
        return self.until is not None and self.until() <= time.monotonic()


class Superseded(Exception):
    """A later try of the job (it took the job over: this try's lease ran out, its worker stalled) wrote one of
    its objects: this try must write nothing more. Its own fence, checked before the upload, could not see it:
    the takeover came during the upload."""


class StorageAccessError(RuntimeError):
    """At start-up: the bucket is missing, or the worker may not write there (`ResultStore.check_access`)."""


# What the worker does in its bucket: create objects, and delete them (an overwrite needs it too), and read the
# metadata of a name another job of the user may own (`is_contested`) before it writes there.
WRITE_PERMISSIONS = ("storage.objects.create", "storage.objects.delete", "storage.objects.get")
SIGNING_CHECK_NAME = "firegen-signing-check"  # a name signed at start-up, never written
PROBE_NAME = "generating/.firegen-probe"  # written during a Storage outage (the retention rule deletes it)
# An object written, downloaded by its URL and deleted at start-up: under generating/, where the retention's lifecycle
# rule deletes one a worker could not (a name no user's folder has: no id starts with a dot).
DOWNLOAD_CHECK_PREFIX = "generating/.firegen-download-check/"
# A download refused for a moment, not for the bucket: no reason to keep a worker down.
PASSING_REFUSALS = {408, 429}


def download_status(url: str, timeout: float) -> int:
    """The HTTP status a GET of `url` answers (its body is not read)."""
    with requests.get(url, timeout=timeout, stream=True) as response:
        return response.status_code


def request_timeout_for(max_seconds: float) -> float:
    """A request's timeout: a third of the call's budget, so that a server that hangs (not refuses) is tried
    again (chaos audit: a Storage paused 90 s took the whole 60 s with its first request), from 1 s to 60 s."""
    return max(1.0, min(60.0, max_seconds / 3))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one `upload()` call tries. `attempts` counts tries per object; `max_seconds` bounds the whole
    call (backoff waits are cut to fit, and each request's timeout is at most what is left, at least 1 s)."""

    attempts: int = 12  # with these waits, enough tries to fill the minute (5 used up a 9 s blip)
    max_seconds: float = 60.0
    initial_wait: float = 0.5
    max_wait: float = 8.0
    request_timeout: float = request_timeout_for(60.0)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_seconds <= 0 or self.initial_wait < 0 or self.request_timeout <= 0:
            raise ValueError(f"invalid {self!r}")

    def backoff(self) -> wait_exponential_jitter:
        """The wait before each retry (tenacity's, of a retry state): `initial_wait`, doubling to `max_wait`."""
        return wait_exponential_jitter(multiplier=self.initial_wait, max=self.max_wait, jitter=self.initial_wait)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        budget = settings.upload_retry_max_seconds
        return cls(
            attempts=settings.upload_retry_attempts, max_seconds=budget, request_timeout=request_timeout_for(budget)
        )


# ---------------------------------------------------------------------------------------------- names
def claim_stamp(claimed_at: datetime) -> int:
    """A claim's server time as the integer `upload(claim=...)` takes: microseconds since the epoch."""
    return round(claimed_at.timestamp() * 1_000_000)


def _claim_of(blob: Any) -> int:
    """The claim stamp an object records; 0 for none (written before it existed) or one that is no number."""
    try:
        return int((blob.metadata or {}).get(CLAIM_METADATA_KEY) or 0)
    except (TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------- errors
def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed."""
    if isinstance(exc, (ConnectionError, TimeoutError)):  # builtins (a StorageError is never retried here)
        return not isinstance(exc, StorageError)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_HTTP or isinstance(
            exc, (api_exceptions.TooManyRequests, api_exceptions.ServerError, api_exceptions.RetryError)
        )
    if isinstance(exc, (TransportError, DataCorruption)):
        return True
    if isinstance(exc, InvalidResponse):
        return getattr(getattr(exc, "response", None), "status_code", None) in TRANSIENT_HTTP
    return False


def signing_transient(exc: BaseException) -> bool:
    """Whether signing a URL again may succeed. google-cloud-storage raises a TransportError for any answer of IAM's
    signBlob but 200, quoting its body: one with a 4xx code but 429 (permission denied) stays so (a review: retried
    as a moment's, a revoked grant held every job its whole upload budget); a connection that failed names none."""
    if isinstance(exc, TransportError):
        code = re.search(r'"code":\s*(\d{3})', str(exc))
        return code is None or code.group(1) == "429" or code.group(1).startswith("5")
    return is_transient(exc)


def _reason(exc: BaseException) -> str:
    """A short description of a failure, with no URL in it."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return f"HTTP {exc.code} {type(exc).__name__}"
    if isinstance(exc, (requests.Timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, (requests.ConnectionError, ConnectionError)):
        return "connection failed"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status} {type(exc).__name__}" if status else type(exc).__name__


def emulator_base_url(host: str) -> str:
    """STORAGE_EMULATOR_HOST as a base URL ("127.0.0.1:9023" and "http://127.0.0.1:9023/" both work)."""
    host = host.strip().rstrip("/")
    return host if "://" in host else f"http://{host}"


# ---------------------------------------------------------------------------------------------- the store
class ResultStore:
    """Uploads results of jobs into one bucket. The client is passed in (nothing is created at import)."""

    def __init__(
        self,
        client: storage.Client,
        bucket: str,
        url_style: str = "token",
        retry: RetryPolicy | None = None,
        emulator_host: str | None = None,
        *,
        signed_url_expiry: timedelta | int = MAX_SIGNED_URL_SECONDS,
        signing_credentials: Any = None,
        on_retry: Callable[[str, int, BaseException], None] | None = None,
        download_check: Callable[[str, float], int] | None = None,
        server_time: Callable[[], float] | None = None,
        firebase_emulator_host: str | None = None,
    ):
        if url_style not in URL_STYLES:
            raise ValueError(f"url_style must be one of {', '.join(URL_STYLES)}")
        if not bucket:
            raise ValueError("bucket is required")
        expiry = signed_url_expiry if isinstance(signed_url_expiry, timedelta) else timedelta(seconds=signed_url_expiry)
        if not timedelta(seconds=1) <= expiry <= timedelta(seconds=MAX_SIGNED_URL_SECONDS):
            raise ValueError("signed URLs expire after 1 s to 7 days")
        self.client = client
        self.bucket_name = bucket
        self.url_style = url_style
        self.retry = retry or RetryPolicy()
        self.emulator_url = emulator_base_url(emulator_host) if emulator_host else None
        # The Firebase CLI's Storage emulator, which serves Firebase's own API (`/v0/b/...`) too.
        self.firebase_emulator_url = (
            emulator_base_url(firebase_emulator_host) if emulator_host and firebase_emulator_host else None
        )
        self.signed_url_expiry = expiry
        self.signing_credentials = signing_credentials
        self.on_retry = on_retry  # called (object name, attempt number, error) before each backoff wait
        # GETs a URL for its HTTP status, at start-up (`check_access`): None, no download is tried.
        self.download_check = download_check
        # Now by Firestore's clock (seconds since the epoch; the worker's measure of it), which dates signed URLs.
        self.server_time = server_time

    @classmethod
    def from_settings(cls, client: storage.Client, settings: Settings, **kwargs: Any) -> ResultStore:
        """The worker's store, built once at start-up (which is when a public bucket is warned about)."""
        if settings.url_style == "public" and not settings.storage_emulator_host:
            structlog.get_logger("listener.storage").warning(
                "public_urls",
                url_style="public",
                note="URL_STYLE=public needs a world-readable bucket: anyone can then list and read every user's "
                "results, and storage.rules do not apply. URL_STYLE=token (the default) works with a private bucket",
            )
        return cls(
            client,
            settings.storage_bucket,
            url_style=settings.url_style,
            retry=RetryPolicy.from_settings(settings),
            emulator_host=settings.storage_emulator_host,
            signed_url_expiry=settings.signed_url_expiry_seconds,
            firebase_emulator_host=settings.firebase_storage_emulator_host,
            **{"download_check": None if settings.storage_emulator_host else download_status, **kwargs},
        )

    # -- uploading
    def upload(
        self,
        user_id: str,
        file_uid: str,
        task_type: str,
        files: Sequence[tuple[bytes, str, str]],
        *,
        claim: int | None = None,
        until: Callable[[], float] | None = None,
    ) -> list[str]:
        """Upload a job's files, `(data, ext, content_type)` each, under the job's deterministic names (its
        alternate, where another job owns one); return one URL per file, in the same order, for the names
        written. Raises StorageError / StorageUnavailable.

        `claim`: when this try claimed the job (`claim_stamp`). Each object then records it, and is written only
        over the generation found there by a check that it is no later try's: a worker that stalled mid-upload
        (stopped, swapped out, its request delayed) while another took the job over and completed it, never
        overwrites the completed job's objects and download tokens when it wakes (`Superseded`).

        `until`: when its caller wants it over by (time.monotonic(); asked before each try): past it nothing more
        is tried and `UploadStopped` is raised (a cancelled job's upload, which kept retrying a failing Storage
        for its whole budget and then failed the job `ConnectionError`)."""
        if not files:
            raise ValueError("no files to upload")
        for index, (_, ext, _) in enumerate(files):  # a bad name is refused before anything is written
            object_name(user_id, file_uid, task_type, index, ext)
        window = Window.of(self.retry.max_seconds, until)
        bucket = self.client.bucket(self.bucket_name)

        def one(index: int) -> tuple[str, str | None]:
            data, ext, content_type = files[index]
            return self._upload_one(
                bucket, (user_id, file_uid, task_type, index, ext), data, content_type, window, claim
            )

        # A job's files at once (a latency audit: 4 images took 8 requests one after another); each has its own
        # names, so they never meet. The client is safe to share across threads (google-cloud-storage's docs).
        if len(files) == 1:
            written = [one(0)]
        else:
            # Each thread runs in a copy of the caller's context: its retries' log lines name the job too.
            contexts = [contextvars.copy_context() for _ in files]
            with ThreadPoolExecutor(min(len(files), UPLOAD_THREADS), thread_name_prefix="upload") as pool:
                written = list(pool.map(lambda index: contexts[index].run(one, index), range(len(files))))
        unused = [stale for _, stale in written if stale]
        if unused:
            self._drop_stale(bucket, user_id, file_uid, task_type, unused, claim)
        return [url for url, _ in written]

    def _upload_one(
        self,
        bucket: Any,
        where: tuple[str, str, str, int, str],
        data: bytes,
        content_type: str,
        window: Window,
        claim: int | None,
    ) -> tuple[str, str | None]:
        """Upload the job's `index`-th file (`where`: user_id, file_uid, task_type, index, ext): (its URL, the job's
        other name for it, to delete, or None)."""
        user_id, file_uid, task_type, index, ext = where
        token = str(uuid.uuid4()) if self.url_style == "token" else None
        metadata = {OWNER_METADATA_KEY: file_uid, **({TOKEN_METADATA_KEY: token} if token else {})}
        content_type = content_type or DEFAULT_FORMAT[task_type][1]
        if claim is not None:
            metadata[CLAIM_METADATA_KEY] = str(claim)
        for tries_left in reversed(range(3)):
            name, stale, generation = self._target(bucket, user_id, file_uid, task_type, index, ext, window, claim)
            try:
                self._put(bucket, name, data, content_type, metadata, window, generation)
                return self._written_url(bucket, name, token, window), stale
            except StorageError as exc:
                # Someone wrote the name between the check and this upload: check again (another job's, and this job
                # takes its alternate; a later try's, and this one stops; an earlier try's, which woke up, and this
                # one writes over it).
                if not tries_left or not isinstance(exc.__cause__, api_exceptions.PreconditionFailed):
                    raise
        raise AssertionError("unreachable: the last try returns or raises")

    def _target(
        self,
        bucket: Any,
        user_id: str,
        file_uid: str,
        task_type: str,
        index: int,
        ext: str,
        window: Window,
        claim: int | None = None,
    ) -> tuple[str, str | None, int | None]:
        """(where the job's `index`-th file goes, the job's other name for it or None, the generation the upload
        must find there: 0 for none, None for no condition). The other name goes once the file is written: an
        earlier try may have written there, and a retry must not leave two. The generation makes the check and
        the upload one step: two jobs that both found a contested name free cannot both write it, and a try
        cannot write over a later try's object that landed after its check."""
        name = object_name(user_id, file_uid, task_type, index, ext)
        contested = is_contested(file_uid, task_type, index)
        if not contested and claim is None:
            return name, None, None
        found, other = self._get(bucket, name, window), None
        if contested:
            alternate = alternate_name(user_id, file_uid, task_type, index, ext)
            if found is not None and owner(found) not in (None, file_uid):
                if claim is None:
                    return alternate, None, None
                name, found = alternate, self._get(bucket, alternate, window)
            else:
                other = alternate
        if claim is not None and found is not None and _claim_of(found) > claim:
            raise Superseded(f"{name}: written by a later try of the job")
        return name, other, (found.generation or 0) if found is not None else 0

    def _written_url(self, bucket: Any, name: str, token: str | None, window: Window) -> str:
        """The URL of an object just written. Keyless credentials sign through IAM's signBlob, a call of its own:
        one that failed a moment failed the job after its upload (a storage review), so it is retried within the
        upload's budget too. What still fails is a StorageError (Storage itself answered: the job's objects go)."""
        if self.url_style != "signed" or self.emulator_url:
            return self._url(bucket, name, token)
        try:
            retrying = self._retrying(window, self._said_retry(name), transient=signing_transient)
            return retrying(lambda: self._signed(name, raw=True))
        except StorageError:
            raise
        except Exception as exc:
            if window.cut and signing_transient(exc):  # its tries stopped for the caller (the worker leaving)
                raise UploadStopped(f"signing a URL for {name} stopped by its caller", storage_away=True) from exc
            raise StorageError(f"Signing a URL for {name} failed ({_reason(exc)})") from exc

    def _get(self, bucket: Any, name: str, window: Window) -> Any:
        return self._within_budget(
            "check", name, lambda timeout: bucket.get_blob(name, timeout=timeout, retry=None), window
        )

    def _put(
        self,
        bucket: Any,
        name: str,
        data: bytes,
        content_type: str,
        metadata: dict[str, str],
        window: Window,
        generation: int | None = None,
    ) -> None:
        def attempt(timeout: float) -> None:
            blob = bucket.blob(name)
            blob.metadata = metadata
            blob.cache_control = PUBLIC_CACHE_CONTROL if self.url_style == "public" else CACHE_CONTROL
            condition = {} if generation is None else {"if_generation_match": generation}
            blob.upload_from_string(data, content_type=content_type, retry=None, timeout=timeout, **condition)

        self._within_budget("upload", name, attempt, window)

    def _drop_stale(
        self, bucket: Any, user_id: str, file_uid: str, task_type: str, unused: list[str], claim: int | None = None
    ) -> None:
        """Delete the job's own alternates it no longer uses (an earlier try wrote there). One listing of its
        alternates (no other job's name starts like them) rather than a delete per name: almost always there are
        none. Its results are written by then: a failure here is logged, never the job's failure. A later try's
        alternate stays (this try stalled, and the later one wrote there while the main name was another job's)."""
        prefix = alternate_name(user_id, file_uid, task_type).rsplit(ALTERNATE_MARK, 1)[0] + ALTERNATE_MARK
        try:
            found = bucket.list_blobs(prefix=prefix, timeout=self.retry.request_timeout)
            ours = {blob.name for blob in found if claim is None or _claim_of(blob) <= claim}
            for name in ours & set(unused):
                results.delete_object(bucket, name, results.Budget(self.retry.request_timeout))
        except Exception as exc:
            log.warning("stale_object_left", objects=unused, error=_reason(exc))

    def _within_budget(self, what: str, name: str, call: Callable[[float], T], window: Window) -> T:
        """`call(request timeout)`, tried again on transient failures within the retry policy and `window`;
        what still fails is raised as StorageError / StorageUnavailable, naming `what` was done to `name`, and
        UploadStopped where the window was cut short."""
        policy = self.retry
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            window.troubled |= attempts > 0  # the tries before this one failed on transient errors (others raise)
            if window.cut:
                raise UploadStopped(
                    f"{what} of {name} stopped by its caller after {attempts} attempt(s)",
                    storage_away=window.troubled,
                )
            attempts += 1
            timeout = max(window.left(), min(1.0, policy.request_timeout))
            return call(min(policy.request_timeout, timeout))

        started = time.monotonic()
        try:
            return self._retrying(window, self._said_retry(name))(attempt)
        except UploadStopped:
            raise
        except Exception as exc:
            if window.cut and is_transient(exc):  # its tries stopped for the caller, not for Storage's answer
                raise UploadStopped(
                    f"{what} of {name} stopped by its caller after {attempts} attempt(s) ({_reason(exc)})",
                    storage_away=True,
                ) from exc
            took = time.monotonic() - started
            if is_transient(exc):
                raise StorageUnavailable(
                    f"Storage unavailable: {what} of {name} failed after {attempts} attempt(s) in {took:.1f}s "
                    f"({_reason(exc)})"
                ) from exc
            raise StorageError(f"Storage {what} of {name} failed ({_reason(exc)})") from exc

    def _said_retry(self, name: str) -> Callable[[Any], None]:
        """Before each backoff wait of a call about object `name`: logged, and told to `on_retry`."""

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception()
            log.warning("upload_retry", object=name, error=_reason(exc), retry=state.attempt_number)
            if self.on_retry:
                self.on_retry(name, state.attempt_number, exc)

        return before_sleep

    def _retrying(
        self,
        window: Window,
        before_sleep: Callable[[Any], None] | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
    ) -> Retrying:
        """Failures `transient` says are tried again, with backoff, within the policy's attempts and `window`."""
        policy = self.retry
        backoff = policy.backoff()

        def wait(state: Any) -> float:
            return max(0.0, min(backoff(state), window.left()))

        def stop(state: Any) -> bool:
            return state.attempt_number >= policy.attempts or window.left() <= 0

        return Retrying(
            retry=retry_if_exception(transient), stop=stop, wait=wait, before_sleep=before_sleep, reraise=True
        )

    # -- checking
    def probe(self) -> None:
        """One small write to the bucket, as a job's upload writes, no retry (`StorageOutage`, once Storage failed a
        job's upload: a read answered by a Storage that failed writes would end the pause too soon)."""
        blob = self.client.bucket(self.bucket_name).blob(PROBE_NAME)
        blob.upload_from_string(b"firegen storage probe", "text/plain", timeout=self.retry.request_timeout, retry=None)

    def check_access(self) -> None:
        """At start-up: the bucket exists and the worker's credentials may write there, and overwrite (a job run
        again writes its names again; a cancelled job's objects are deleted). Raises StorageAccessError naming
        the bucket and what is missing: without this check every job would fail at its upload, after its GPU
        time. Asks IAM's testIamPermissions, which needs no permission of its own."""
        window = Window.of(self.retry.max_seconds)
        bucket = self.client.bucket(self.bucket_name)
        try:
            granted = self._retrying(window)(
                bucket.test_iam_permissions, list(WRITE_PERMISSIONS), timeout=self.retry.request_timeout, retry=None
            )
        except api_exceptions.NotFound:
            raise StorageAccessError(f"bucket {self.bucket_name} does not exist (STORAGE_BUCKET)") from None
        except Exception as exc:
            raise StorageAccessError(f"bucket {self.bucket_name} could not be checked ({_reason(exc)})") from None
        missing = [permission for permission in WRITE_PERMISSIONS if permission not in granted]
        if missing:
            raise StorageAccessError(
                f"the worker's credentials may not write to bucket {self.bucket_name}: no {', '.join(missing)} "
                "(grant its service account roles/storage.objectUser on the bucket)"
            )
        if self.url_style == "signed" and not self.emulator_url:
            # One URL signed now, as each job's will be: credentials that cannot sign (no key, no signBlob) would
            # otherwise fail every job at its upload, after its GPU time (an audit).
            try:
                self._signed(SIGNING_CHECK_NAME)
            except StorageError as exc:
                raise StorageAccessError(f"{exc} (URL_STYLE=signed)") from None
        if self.url_style in ("token", "public") and self.download_check and not self.emulator_url:
            self._check_download(bucket, window, self.download_check)

    def _check_download(self, bucket: Any, window: Window, get: Callable[[str, float], int]) -> None:
        """One object written and fetched by its URL as a client would (the production review: a token URL is
        served by Firebase Storage, which needs the bucket linked to Firebase and its service agent allowed to
        read it, a public one by a world-readable bucket: otherwise every job completes with URLs that answer
        403 or 412). A 4xx stops the start; anything else unexpected (Firebase Storage unreachable a moment) is
        logged, and the worker starts: its jobs may well work."""
        name = f"{DOWNLOAD_CHECK_PREFIX}{uuid.uuid4().hex}.txt"
        token = str(uuid.uuid4()) if self.url_style == "token" else None
        metadata = {TOKEN_METADATA_KEY: token} if token else {}
        self._put(bucket, name, b"firegen download check", "text/plain", metadata, window)
        status: int | None = None
        try:
            status = get(self._url(bucket, name, token), self.retry.request_timeout)
            problem = f"HTTP {status}"
        except requests.RequestException as exc:
            problem = _reason(exc)
        finally:
            try:
                results.delete_object(bucket, name, results.Budget(self.retry.request_timeout))
            except Exception as exc:  # one small object left behind stops nothing
                log.warning("download_check_left", object=name, error=_reason(exc))
        if status is not None and 400 <= status < 500 and status not in PASSING_REFUSALS:
            how = {
                "token": "link the bucket to Firebase (the console's Storage page), and let its service agent read "
                "it (re-link it where its IAM policy was rewritten), or use URL_STYLE=signed",
                "public": "the bucket is not world-readable; URL_STYLE=token works with a private bucket",
            }[self.url_style]
            raise StorageAccessError(
                f"download URLs of bucket {self.bucket_name} do not work: a {self.url_style} URL answered HTTP "
                f"{status} (URL_STYLE={self.url_style}: {how})"
            )
        if status != 200:
            log.warning("download_check_inconclusive", url_style=self.url_style, error=problem)

    # -- removing
    def remove(self, user_id: str, file_uid: str, task_type: str, count: int, *, strict: bool = False) -> int:
        """Delete a job's result objects (a cancelled or timed-out job's partial upload); returns how many
        existed. Only the job's own names: its deterministic ones it owns, and its alternates; never a prefix,
        which would match other jobs. `strict`: a contested name only where its metadata names the job
        (`results.remove`)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        return self._remove(user_id, file_uid, task_type, range(count), strict=strict)

    def remove_beyond(self, user_id: str, file_uid: str, task_type: str, count: int) -> int:
        """Delete the job's image names past its first `count` (an earlier try of more images, stopped after its
        upload: its request restated it); returns how many existed."""
        return self._remove(user_id, file_uid, task_type, range(count, most(task_type)))

    def remove_written(self, user_id: str, file_uid: str, task_type: str, count: int, claim: int) -> int:
        """Delete the objects of the job's first `count` that the try of `claim` (`claim_stamp`) wrote, under either
        name, and no other (a later try's, another job's); returns how many. Each delete holds to the object's
        generation as read."""
        bucket, budget = self.client.bucket(self.bucket_name), results.Budget(self.retry.request_timeout)
        removed = 0
        for index in range(count):
            for name in (
                object_name(user_id, file_uid, task_type, index),
                alternate_name(user_id, file_uid, task_type, index),
            ):
                found = bucket.get_blob(name, **budget.call())
                if found is None or owner(found) != file_uid or _claim_of(found) != claim:
                    continue
                try:
                    found.delete(if_generation_match=found.generation, **budget.call())
                    removed += 1
                except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):  # gone, or written again since
                    pass
        return removed

    def _remove(self, user_id: str, file_uid: str, task_type: str, indices: range, *, strict: bool = False) -> int:
        bucket, budget = self.client.bucket(self.bucket_name), results.Budget(self.retry.request_timeout)
        return results.remove(bucket, user_id, file_uid, task_type, indices, budget, strict=strict)

    # -- URLs
    def url_for(self, name: str, token: str | None = None) -> str:
        """The URL of an uploaded object in this store's style (signed URLs are made anew each call)."""
        return self._url(self.client.bucket(self.bucket_name), name, token)

    def _url(self, bucket: Any, name: str, token: str | None) -> str:
        quoted = quote(name, safe="")
        if self.firebase_emulator_url and token:
            return f"{self.firebase_emulator_url}/v0/b/{self.bucket_name}/o/{quoted}?alt=media&token={token}"
        if self.emulator_url:
            url = f"{self.emulator_url}/download/storage/v1/b/{self.bucket_name}/o/{quoted}?alt=media"
            return f"{url}&token={token}" if token else url
        if self.url_style == "token":
            if not token:
                raise ValueError("token URLs need the object's download token")
            return f"{FIREBASE_BASE}/v0/b/{self.bucket_name}/o/{quoted}?alt=media&token={token}"
        if self.url_style == "signed":
            return self._signed(name)
        return f"{PUBLIC_BASE}/{self.bucket_name}/{quote(name, safe='/~')}"

    def _signed(self, name: str, *, raw: bool = False) -> str:
        """A V4 signed URL for `name`; a failure as StorageError (`raw`: as the signer raised it, to be retried)."""
        credentials = self.signing_credentials or getattr(self.client, "_credentials", None)
        kwargs: dict[str, Any] = dict(
            resource=f"/{self.bucket_name}/{quote(name, safe='/~')}",
            expiration=self.signed_url_expiry,
            method="GET",
            api_access_endpoint=PUBLIC_BASE,
            universe_domain=getattr(self.client, "universe_domain", None) or "googleapis.com",
        )
        if self.server_time is not None:
            # X-Goog-Date is when the URL becomes usable: by a host clock minutes fast (RunPod's hosts may be), a
            # result could not be fetched for minutes after its job completed (the clock review). The library takes
            # the date only through this parameter of its V4 signer, which `Blob.generate_signed_url` calls.
            kwargs["_request_timestamp"] = datetime.fromtimestamp(self.server_time(), UTC).strftime("%Y%m%dT%H%M%SZ")
        try:
            if credentials is not None and hasattr(credentials, "sign_bytes"):
                return generate_signed_url_v4(credentials, **kwargs)
            # Credentials without a key (Compute Engine, workload identity): sign through IAM signBlob.
            email = getattr(credentials, "service_account_email", None)
            if credentials is None or not email:
                raise StorageError(
                    "URL_STYLE=signed needs credentials that can sign (a service account); use public or token"
                )
            if not getattr(credentials, "token", None) or not getattr(credentials, "valid", True):
                from google.auth.transport.requests import Request

                credentials.refresh(Request())
            return generate_signed_url_v4(
                credentials, service_account_email=email, access_token=credentials.token, **kwargs
            )
        except StorageError:
            raise
        except Exception as exc:
            if raw:
                raise
            raise StorageError(f"Signing a URL for {name} failed ({_reason(exc)})") from exc
