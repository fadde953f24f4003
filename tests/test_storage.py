"""listener.storage against the real Storage emulator, and listener.settings."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote, unquote, urlparse

import pytest
import requests
import structlog
import structlog.testing

from devtools import emulators as emu
from firegen_core.contract import ContractError, check_id
from firegen_core.errors import CONNECTION_ERROR, classify
from firegen_core.results import object_name
from listener import storage as results
from listener.credentials import clients
from listener.settings import Settings, SettingsError, load_settings
from listener.storage import (
    TOKEN_METADATA_KEY,
    WRITE_PERMISSIONS,
    ResultStore,
    RetryPolicy,
    StorageAccessError,
    StorageError,
    StorageUnavailable,
    is_transient,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PNG2 = b"\x89PNG\r\n\x1a\n" + b"second image" * 50
MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)) * 10
FAST = RetryPolicy(attempts=3, max_seconds=5, initial_wait=0.01, max_wait=0.05, request_timeout=5)
DEADLINE_S = 20


@pytest.fixture
def store(storage_client, bucket, storage_emulator):
    return ResultStore(storage_client, bucket.name, retry=FAST, emulator_host=storage_emulator.url)


def fetch(url: str) -> requests.Response:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, (url, resp.status_code)
    return resp


def images(*blobs: bytes):
    return [(b, "png", "image/png") for b in blobs]


def name_of(url: str) -> str:
    """The object an emulator download URL is for."""
    return unquote(urlparse(url).path.rsplit("/o/", 1)[1])


def token_of(url: str) -> str:
    return parse_qs(urlparse(url).query)["token"][0]


def intact(bucket, url: str, data: bytes) -> None:
    """The object behind a URL a job recorded still has its bytes, and its token still opens it (Firebase Storage
    serves a token URL only while the token is in the object's metadata; the emulator checks no token)."""
    assert fetch(url).content == data
    assert bucket.get_blob(name_of(url)).metadata[TOKEN_METADATA_KEY] == token_of(url)


def stored(bucket) -> list[str]:
    return sorted(blob.name.rsplit("/", 1)[1] for blob in bucket.list_blobs())


def signing_credentials():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": "demo-test",
            "private_key_id": "test",
            "private_key": pem,
            "client_email": "worker@demo-test.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


# ---------------------------------------------------------------------------------------------- names
def test_object_names_are_deterministic():
    assert [object_name("user123", "file456", "text2image", i) for i in range(3)] == [
        "generating/user123/image/file456.png",
        "generating/user123/image/file456_1.png",
        "generating/user123/image/file456_2.png",
    ]
    assert object_name("user123", "file789", "text2video") == "generating/user123/video/file789.mp4"
    assert object_name("u", "f", "text2image", ext="webp") == "generating/u/image/f.webp"


@pytest.mark.parametrize(
    "user_id, file_uid, task_type",
    [("", "f", "text2image"), ("a/b", "f", "text2image"), ("u", "..", "text2image"), ("u", "f", "img2img")],
)
def test_object_names_refuse_bad_parts(user_id, file_uid, task_type):
    with pytest.raises(ValueError):
        object_name(user_id, file_uid, task_type)


def test_a_name_another_job_may_own_has_an_alternate_that_no_other_name_equals():
    """`x_1.png` is image 1 of job `x` and image 0 of job `x_1` (a file_uid may hold `_`): such a name is
    contested, and its alternate holds `!`, which no file_uid may hold, so it is the job's alone."""
    assert results.is_contested("x", "text2image", 1) and results.is_contested("x_1", "text2image", 0)
    assert results.is_contested("x_3", "text2image", 0) and not results.is_contested("x_4", "text2image", 0)
    assert not results.is_contested("x", "text2image", 0) and not results.is_contested("x_1", "text2video", 0)
    assert results.alternate_name("user123", "file456", "text2image", 1) == "generating/user123/image/file456!1.png"
    assert results.alternate_name("u", "x_1", "text2image", 0) == "generating/u/image/x_1!0.png"
    with pytest.raises(ContractError):
        check_id("file_uid", "file456!1")
    with pytest.raises(ValueError):  # nor may the store's names: `!` is what keeps alternates apart
        results.object_name("u", "file456!1", "text2image")
    uids = ["x", "x_1", "x_2", "x_3", "x_1_1", "x.png", "x_", "_1", "x.1"]
    owners: dict[str, set[str]] = {}
    for uid in uids:
        for i in range(4):
            owners.setdefault(results.object_name("u", uid, "text2image", i), set()).add(uid)
    alternates = [results.alternate_name("u", uid, "text2image", i) for uid in uids for i in range(4)]
    assert len(set(alternates)) == len(alternates) and not set(alternates) & set(owners)
    for name, jobs in owners.items():  # a name two jobs could use is a contested one for each of them
        if len(jobs) > 1:
            assert all(
                results.is_contested(uid, "text2image", i)
                for uid in jobs
                for i in range(4)
                if results.object_name("u", uid, "text2image", i) == name
            ), name
    assert quote(alternates[1], safe="") == "generating%2Fu%2Fimage%2Fx%211.png"


# ---------------------------------------------------------------------------------------------- uploads
def test_upload_two_images_and_a_video(store, bucket):
    urls = store.upload("user123", "file456", "text2image", images(PNG, PNG2))
    assert len(urls) == 2
    for url, data in zip(urls, (PNG, PNG2)):
        resp = fetch(url)
        assert resp.content == data
        assert resp.headers["Content-Type"] == "image/png"
    assert "generating%2Fuser123%2Fimage%2Ffile456_1.png" in urls[1]

    [video_url] = store.upload("user123", "file789", "text2video", [(MP4, "mp4", "video/mp4")])
    resp = fetch(video_url)
    assert resp.content == MP4 and resp.headers["Content-Type"] == "video/mp4"
    assert sorted(b.name for b in bucket.list_blobs()) == [
        "generating/user123/image/file456.png",
        "generating/user123/image/file456_1.png",
        "generating/user123/video/file789.mp4",
    ]
    # Browsers may keep a result: its bytes never change under the URL a doc records.
    assert {b.cache_control for b in bucket.list_blobs()} == {"private, max-age=31536000, immutable"}


def test_a_large_video_goes_through_the_resumable_path(store, bucket):
    big = MP4 + b"\x01" * (9 * 1024 * 1024)  # above the library's 8 MiB multipart limit
    [url] = store.upload("u", "big", "text2video", [(big, "mp4", "video/mp4")])
    assert fetch(url).content == big
    assert bucket.get_blob("generating/u/video/big.mp4").cache_control == "private, max-age=31536000, immutable"


def test_reupload_overwrites_and_adds_nothing(store, bucket):
    store.upload("u", "f", "text2image", images(PNG, PNG2))
    urls = store.upload("u", "f", "text2image", images(b"new-0", b"new-1"))
    assert len(list(bucket.list_blobs())) == 2
    assert [fetch(u).content for u in urls] == [b"new-0", b"new-1"]


# Security audit: job `x`'s image 1 and job `x_1`'s image 0 had the same name, `x_1.png`.
def test_a_job_never_overwrites_another_jobs_result_of_the_same_name(store, bucket):
    [other] = store.upload("u", "c_1", "text2image", images(PNG))
    urls = store.upload("u", "c", "text2image", images(b"c-0", b"c-1"))
    intact(bucket, other, PNG)
    assert [fetch(u).content for u in urls] == [b"c-0", b"c-1"]
    assert [name_of(u) for u in urls] == ["generating/u/image/c.png", "generating/u/image/c!1.png"]
    # A retry of `c` finds `c_1`'s object again, and overwrites its own names: nothing more.
    again = store.upload("u", "c", "text2image", images(b"c-0 again", b"c-1 again"))
    assert [name_of(u) for u in again] == [name_of(u) for u in urls]
    assert [fetch(u).content for u in again] == [b"c-0 again", b"c-1 again"]
    intact(bucket, other, PNG)
    assert stored(bucket) == ["c!1.png", "c.png", "c_1.png"]
    # The other way round: `c_1` comes after `c` took `c_1.png`, and writes its own alternate.
    urls = store.upload("u", "k", "text2image", images(b"k-0", b"k-1"))
    [late] = store.upload("u", "k_1", "text2image", images(PNG2))
    assert name_of(late) == "generating/u/image/k_1!0.png"
    intact(bucket, late, PNG2)
    intact(bucket, urls[1], b"k-1")
    # An object without owner metadata (written before it existed) counts as the job's own, as it did.
    bucket.blob("generating/u/image/m_1.png").upload_from_string(b"old", content_type="image/png")
    urls = store.upload("u", "m", "text2image", images(b"m-0", b"m-1"))
    assert name_of(urls[1]) == "generating/u/image/m_1.png" and fetch(urls[1]).content == b"m-1"
    # Once `c_1`'s result is gone, a retry of `c` takes `c_1.png` and leaves no copy at its alternate.
    assert store.remove("u", "c_1", "text2image", 1) == 1
    urls = store.upload("u", "c", "text2image", images(b"c-0", b"c-1"))
    assert name_of(urls[1]) == "generating/u/image/c_1.png" and fetch(urls[1]).content == b"c-1"
    assert [n for n in stored(bucket) if n.startswith("c")] == ["c.png", "c_1.png"]


class Preconditioned:
    """The bucket as Cloud Storage enforces `if_generation_match` (the emulator ignores it; a stand-in on the
    upload call only): another job's upload of `racing` lands between this job's check and its own upload. This
    job's other files (uploaded at once, on threads of their own) are written once it has landed: the stand-in's
    check and upload are two calls, and the other upload landing between them was written over (the flake of
    `test_a_later_try_landing_during_a_stalled_uploads_request_wins`, 4 runs in 14; Cloud Storage's conditional
    write is one step)."""

    def __init__(self, client, racing, other_upload):
        self.client, self.racing, self.other_upload, self.conditions = client, racing, other_upload, []
        self.landed = threading.Event()

    def bucket(self, name):
        real, stand_in = self.client.bucket(name), self

        class Bucket:
            def blob(self, blob_name):
                blob = real.blob(blob_name)
                upload = blob.upload_from_string

                def conditional_upload(data, if_generation_match=None, **kwargs):
                    stand_in.conditions.append((blob_name, if_generation_match))
                    if blob_name == stand_in.racing and stand_in.other_upload is not None:
                        stand_in.other_upload(), setattr(stand_in, "other_upload", None)
                        stand_in.landed.set()
                    elif blob_name != stand_in.racing:
                        assert stand_in.landed.wait(30), "the racing upload never came"
                    found = real.get_blob(blob_name)
                    if if_generation_match is not None and (found.generation if found else 0) != if_generation_match:
                        from google.api_core.exceptions import PreconditionFailed

                        raise PreconditionFailed("At least one of the pre-conditions you specified did not hold.")
                    return upload(data, **kwargs)

                blob.upload_from_string = conditional_upload
                return blob

            def __getattr__(self, attr):
                return getattr(real, attr)

        return Bucket()


def test_two_jobs_racing_for_a_name_do_not_both_write_it(store, storage_client, bucket, storage_emulator):
    """The re-check audit (from the code): `x` and `x_1` finishing together could both find `x_1.png` free, and
    the later upload overwrite the earlier. The upload is conditional on what the check found."""
    other = []
    racing = Preconditioned(
        storage_client,
        "generating/u/image/r_1.png",
        lambda: other.extend(store.upload("u", "r_1", "text2image", images(PNG))),
    )
    racer = ResultStore(racing, bucket.name, retry=FAST, emulator_host=storage_emulator.url)
    urls = racer.upload("u", "r", "text2image", images(b"r-0", b"r-1"))
    assert [name_of(u) for u in urls] == ["generating/u/image/r.png", "generating/u/image/r!1.png"]
    intact(bucket, other[0], PNG)
    assert ("generating/u/image/r_1.png", 0) in racing.conditions  # found free: written only if still free


def test_a_stalled_try_never_writes_over_a_later_trys_objects(store, bucket):
    """The chaos audit: a worker stopped (SIGSTOP) mid-upload woke after another had taken its job over and
    completed it, and wrote over 3 of the 4 images with new download tokens: on Cloud Storage the completed doc's
    URLs were refused (the emulator ignores tokens). Each object records its try's claim, and no try writes over
    a later one's."""
    early, late = 1_700_000_000_000_000, 1_700_000_000_000_001
    store.upload("u", "s", "text2image", images(b"stalled-0"), claim=early)  # before the stall
    done = store.upload("u", "s", "text2image", images(b"new-0", b"new-1", b"new-2"), claim=late)  # the new owner
    with pytest.raises(results.Superseded):
        store.upload("u", "s", "text2image", images(b"stalled-0", b"stalled-1", b"stalled-2"), claim=early)
    for url, data in zip(done, (b"new-0", b"new-1", b"new-2"), strict=True):
        intact(bucket, url, data)
    # A later try writes over an earlier one's objects, as a retry always did (and over objects without a claim).
    again = store.upload("u", "s", "text2image", images(b"later-0", b"later-1", b"later-2"), claim=late + 1)
    assert [fetch(url).content for url in again] == [b"later-0", b"later-1", b"later-2"]
    assert {b.metadata[results.CLAIM_METADATA_KEY] for b in bucket.list_blobs(prefix="generating/u/image/s")} == {
        str(late + 1)
    }


def test_a_stalled_try_never_deletes_a_later_trys_alternate(store, storage_client, bucket):
    """The day's review: a later try wrote image 1 of `v` at its alternate `v!1.png` (`v_1.png` was job `v_1`'s);
    `v_1`'s result went; a stalled earlier try then wrote `v_1.png`, and deleted `v!1.png`, its "stale" alternate,
    which the later try's completed doc names. Only alternates of no later try are removed."""
    store.upload("u", "v_1", "text2image", images(b"other"))
    later = store.upload("u", "v", "text2image", images(b"v-0", b"v-1"), claim=2_000)
    assert name_of(later[1]) == "generating/u/image/v!1.png"
    alternate = name_of(later[1])
    real = storage_client.bucket(bucket.name)
    store._drop_stale(real, "u", "v", "text2image", [alternate], claim=1_000)  # the stalled try's clean-up
    intact(bucket, later[1], b"v-1")
    store._drop_stale(real, "u", "v", "text2image", [alternate], claim=3_000)  # a later try's own clean-up
    assert bucket.get_blob(alternate) is None


def test_a_later_try_landing_during_a_stalled_uploads_request_wins(store, storage_client, bucket, storage_emulator):
    """The takeover lands between the stalled try's check of an image and its upload (its request delayed): the
    upload is conditional on the generation the check found, so it fails, and the check again finds the later
    try's object."""
    early, late = 1_000_000, 2_000_000
    done = []
    racing = Preconditioned(
        storage_client,
        "generating/u/image/t_1.png",
        lambda: done.extend(store.upload("u", "t", "text2image", images(b"new-0", b"new-1"), claim=late)),
    )
    stalled = ResultStore(racing, bucket.name, retry=FAST, emulator_host=storage_emulator.url)
    with pytest.raises(results.Superseded):
        stalled.upload("u", "t", "text2image", images(b"old-0", b"old-1"), claim=early)
    for url, data in zip(done, (b"new-0", b"new-1"), strict=True):
        intact(bucket, url, data)
    assert ("generating/u/image/t_1.png", 0) in racing.conditions  # found free: written only if still free


def test_a_jobs_files_are_uploaded_at_once(store, bucket, monkeypatch):
    """A latency audit: a job's images went up one after another, a check and an upload each (8 requests in a row
    for 4 images). Three uploads that never meet at once time the barrier out (BrokenBarrierError)."""
    together, put = threading.Barrier(3, timeout=10), store._put

    def at_once(*args, **kwargs):
        together.wait()
        return put(*args, **kwargs)

    monkeypatch.setattr(store, "_put", at_once)
    urls = store.upload("u", "p", "text2image", images(b"p-0", b"p-1", b"p-2"), claim=1)
    assert [name_of(url) for url in urls] == [f"generating/u/image/p{suffix}.png" for suffix in ("", "_1", "_2")]
    for url, data in zip(urls, (b"p-0", b"p-1", b"p-2"), strict=True):
        intact(bucket, url, data)


def test_a_cancelled_job_removes_only_its_own_objects(store, bucket):
    others = {uid: store.upload("u", uid, "text2image", images(uid.encode()))[0] for uid in ("d_1", "d_2")}
    store.upload("u", "d", "text2image", images(b"d-0", b"d-1", b"d-2"))  # a try stopped short of its 4 images
    again = store.upload("u", "d", "text2image", images(b"d-0", b"d-1", b"d-2"))
    assert stored(bucket) == ["d!1.png", "d!2.png", "d.png", "d_1.png", "d_2.png"]
    assert fetch(again[2]).content == b"d-2"
    assert store.remove("u", "d", "text2image", 4) == 3
    assert stored(bucket) == ["d_1.png", "d_2.png"]
    for uid, url in others.items():
        intact(bucket, url, uid.encode())


def test_a_job_completing_on_a_later_try_removes_only_its_own_extra_images(store, bucket):
    [other] = store.upload("u", "e_2", "text2image", images(PNG))
    # Its request restated to one image before the first try uploaded anything.
    store.upload("u", "e", "text2image", images(b"e-0"))
    assert store.remove_beyond("u", "e", "text2image", 1) == 0
    intact(bucket, other, PNG)
    # A first try that uploaded its 4 images: the later try of 1 image removes the three others, its own.
    first = store.upload("u", "e", "text2image", images(b"e-0", b"e-1", b"e-2", b"e-3"))
    assert [name_of(u).rsplit("/", 1)[1] for u in first] == ["e.png", "e_1.png", "e!2.png", "e_3.png"]
    [url] = store.upload("u", "e", "text2image", images(b"e-0 again"))
    assert store.remove_beyond("u", "e", "text2image", 1) == 3
    assert stored(bucket) == ["e.png", "e_2.png"]
    assert fetch(url).content == b"e-0 again"
    intact(bucket, other, PNG)


# ---------------------------------------------------------------------------------------------- URL styles
def test_public_url_is_the_contracts_form(storage_client, bucket):
    store = ResultStore(storage_client, bucket.name, url_style="public", retry=FAST)
    urls = store.upload("user123", "file456", "text2image", images(PNG, PNG2))
    assert urls == [
        f"https://storage.googleapis.com/{bucket.name}/generating/user123/image/file456.png",
        f"https://storage.googleapis.com/{bucket.name}/generating/user123/image/file456_1.png",
    ]
    # The URL is the name alone, which a job deleted and sent again under its file_uid writes anew: a browser that
    # kept the first bytes for a year (`immutable`, right for token URLs) would show the deleted job's image.
    assert {b.cache_control for b in bucket.list_blobs()} == {"private, no-cache"}


def test_token_url_and_metadata(storage_client, bucket):
    store = ResultStore(storage_client, bucket.name, url_style="token", retry=FAST)
    [url] = store.upload("user123", "file456", "text2image", images(PNG))
    token = bucket.get_blob("generating/user123/image/file456.png").metadata[TOKEN_METADATA_KEY]
    assert len(token) == 36
    assert url == (
        f"https://firebasestorage.googleapis.com/v0/b/{bucket.name}/o/"
        f"generating%2Fuser123%2Fimage%2Ffile456.png?alt=media&token={token}"
    )
    # A re-upload gets a new token, and the old one stops working: Firebase Storage serves a token URL only while
    # the token is among the object's `firebaseStorageDownloadTokens` (comma-separated); the emulator does not
    # check tokens, so the metadata is what is asserted.
    [url2] = store.upload("user123", "file456", "text2image", images(PNG))
    tokens = bucket.get_blob("generating/user123/image/file456.png").metadata[TOKEN_METADATA_KEY].split(",")
    assert tokens == [parse_qs(urlparse(url2).query)["token"][0]] and token not in tokens


def test_token_url_under_the_emulator_downloads(storage_client, bucket, storage_emulator):
    store = ResultStore(storage_client, bucket.name, url_style="token", retry=FAST, emulator_host=storage_emulator.url)
    [url] = store.upload("u", "f", "text2image", images(PNG))
    token = parse_qs(urlparse(url).query)["token"][0]
    assert bucket.get_blob("generating/u/image/f.png").metadata[TOKEN_METADATA_KEY] == token
    assert url.startswith(storage_emulator.url + "/download/storage/v1/b/")
    assert fetch(url).content == PNG


def test_token_urls_under_the_firebase_clis_emulator_take_firebases_form(storage_client, bucket, storage_emulator):
    """FIREBASE_STORAGE_EMULATOR_HOST (make dev, with the Firebase CLI's Storage emulator): token URLs are Firebase's
    on the emulator, as the JS SDK's getDownloadURL() gives there, so that its ref(storage, url) reads them (it took
    the emulator's download path for a bucket named `download`). Other styles keep the download path."""
    name = quote("generating/u/image/f.png", safe="")
    token_store, signed = (
        ResultStore(
            storage_client,
            bucket.name,
            url_style=style,
            retry=FAST,
            emulator_host=storage_emulator.url,
            firebase_emulator_host="127.0.0.1:9199",
        )
        for style in ("token", "signed")
    )
    assert token_store.url_for("generating/u/image/f.png", "tok") == (
        f"http://127.0.0.1:9199/v0/b/{bucket.name}/o/{name}?alt=media&token=tok"
    )
    assert signed.url_for("generating/u/image/f.png") == (
        f"{storage_emulator.url}/download/storage/v1/b/{bucket.name}/o/{name}?alt=media"
    )
    # Only beside STORAGE_EMULATOR_HOST: alone it names no emulator the worker's client writes to.
    alone = ResultStore(storage_client, bucket.name, url_style="token", firebase_emulator_host="127.0.0.1:9199")
    assert alone.url_for("generating/u/image/f.png", "tok").startswith("https://firebasestorage.googleapis.com/v0/b/")


def signed_store(storage_client, bucket, credentials=None, **more) -> ResultStore:
    """A store of signed URLs that expire after an hour, signing with `credentials` (a new key's by default)."""
    return ResultStore(
        storage_client,
        bucket.name,
        url_style="signed",
        retry=FAST,
        signed_url_expiry=3600,
        signing_credentials=credentials or signing_credentials(),
        **more,
    )


def test_signed_url_v4(storage_client, bucket):
    store = signed_store(storage_client, bucket)
    [url] = store.upload("user123", "file456", "text2image", images(PNG))
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    assert f"{parsed.scheme}://{parsed.netloc}{parsed.path}" == (
        f"https://storage.googleapis.com/{bucket.name}/generating/user123/image/file456.png"
    )
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Expires"] == ["3600"]
    assert query["X-Goog-Credential"][0].startswith("worker@demo-test.iam.gserviceaccount.com/")
    assert "X-Goog-Signature" in query


def test_signed_urls_are_dated_by_firestores_clock_as_the_worker_measured_it(storage_client, bucket, monkeypatch):
    """The clock review: X-Goog-Date is when a signed URL becomes usable, and it was this host's clock: a RunPod host
    minutes fast made every result unusable for minutes after its job completed. The worker's measure of
    Firestore's clock dates them. Signed as the library's own `Blob.generate_signed_url` signs (same URL, byte for
    byte, at the same date: its date fixed for the comparison)."""
    from google.cloud.storage import _signing

    server = datetime(2026, 12, 5, 23, 58, 7, tzinfo=UTC)
    credentials = signing_credentials()
    store = signed_store(storage_client, bucket, credentials, server_time=server.timestamp)
    [url] = store.upload("user123", "file 456", "text2image", images(PNG))
    query = parse_qs(urlparse(url).query)
    assert query["X-Goog-Date"] == ["20261205T235807Z"] and "/20261205/auto/storage/" in query["X-Goog-Credential"][0]
    monkeypatch.setattr(_signing, "get_v4_now_dtstamps", lambda: ("20261205T235807Z", "20261205"))
    blob = bucket.blob("generating/user123/image/file 456.png")
    assert url == blob.generate_signed_url(
        version="v4",
        expiration=3600,
        method="GET",
        api_access_endpoint="https://storage.googleapis.com",
        credentials=credentials,
    )


def test_keyless_credentials_sign_through_iam_as_the_library_does(storage_client, bucket, monkeypatch):
    """Credentials without a key (workload identity, a Compute Engine account) sign through IAM's signBlob: the
    same URL as `Blob.generate_signed_url` with the account's email and token, dated by Firestore's clock. IAM
    cannot be reached here: its answer is the one stand-in (a fixed signature), the rest is the library's."""
    import base64

    from google.cloud.storage import _signing

    class Keyless:  # what google.auth gives on Compute Engine: an email and a token, no sign_bytes
        service_account_email, token, valid = "worker@demo-test.iam.gserviceaccount.com", "access-token", True

    signed_with = []

    def sign_blob(message, access_token, service_account_email, universe_domain="googleapis.com"):
        signed_with.append((access_token, service_account_email))
        return base64.b64encode(b"signature from IAM").decode()

    monkeypatch.setattr(_signing, "_sign_message", sign_blob)
    server = datetime(2026, 12, 5, 23, 58, 7, tzinfo=UTC)
    store = signed_store(storage_client, bucket, Keyless(), server_time=server.timestamp)
    [url] = store.upload("user123", "file456", "text2image", images(PNG))
    assert signed_with == [("access-token", Keyless.service_account_email)]
    monkeypatch.setattr(_signing, "get_v4_now_dtstamps", lambda: ("20261205T235807Z", "20261205"))
    assert url == bucket.blob("generating/user123/image/file456.png").generate_signed_url(
        version="v4",
        expiration=3600,
        method="GET",
        api_access_endpoint="https://storage.googleapis.com",
        credentials=Keyless(),
        service_account_email=Keyless.service_account_email,
        access_token="access-token",
    )


def test_signed_url_without_signing_credentials_is_a_storage_error(storage_client, bucket):
    store = ResultStore(storage_client, bucket.name, url_style="signed", retry=FAST)  # anonymous credentials
    with pytest.raises(StorageError, match="can sign"):
        store.upload("u", "f", "text2image", images(PNG))


def test_a_signing_that_fails_a_moment_is_tried_again(storage_client, bucket):
    """A storage review: keyless credentials sign through IAM's signBlob, a call of its own, never tried again: a
    moment's 503 failed the job after its upload. Stand-in for IAM (none runs here): a key whose signer fails once
    as the transport does."""
    from google.auth.exceptions import TransportError

    credentials, signed = signing_credentials(), []
    sign = credentials.sign_bytes

    def flaky(message: bytes) -> bytes:
        signed.append(message)
        if len(signed) == 1:
            raise TransportError("signBlob answered 503")
        return sign(message)

    credentials.sign_bytes = flaky
    store = ResultStore(storage_client, bucket.name, url_style="signed", retry=FAST, signing_credentials=credentials)
    with structlog.testing.capture_logs() as logs:
        [url] = store.upload("u", "signed-again", "text2image", images(PNG))
    assert len(signed) == 2 and url.startswith(f"https://storage.googleapis.com/{bucket.name}/generating/u/image/")
    assert [log["error"] for log in logs if log["event"] == "upload_retry"] == ["TransportError"]


def test_a_signing_refused_for_good_is_not_tried_again(storage_client, bucket):
    """A review of the retry above: signBlob's 403 (the worker's grant to sign revoked) comes as the same
    TransportError, quoting IAM's answer; tried again, each job held its whole upload budget, then failed as
    Storage unavailable with its objects left. Stand-in for IAM, as above."""
    from google.auth.exceptions import TransportError

    credentials, signed = signing_credentials(), []
    denied = b'{"error": {"code": 403, "message": "Permission iam.serviceAccounts.signBlob denied"}}'

    def refused(message: bytes) -> bytes:
        signed.append(message)
        raise TransportError(f"Error calling the IAM signBytes API: {denied!r}")

    credentials.sign_bytes = refused
    store = ResultStore(storage_client, bucket.name, url_style="signed", retry=FAST, signing_credentials=credentials)
    with pytest.raises(StorageError) as failed:
        store.upload("u", "signed-refused", "text2image", images(PNG))
    assert not isinstance(failed.value, results.StorageUnavailable) and len(signed) == 1
    assert str(failed.value) == "Signing a URL for generating/u/image/signed-refused.png failed (TransportError)"


def test_the_start_up_check_signs_a_url_when_urls_are_signed(storage_client, bucket):
    """Credentials that cannot sign stop the start (every job would fail at its upload, after its GPU time);
    ones that can pass. The bucket is the emulator's; the URL is signed as on Cloud Storage (no emulator URL)."""
    cannot = ResultStore(storage_client, bucket.name, url_style="signed", retry=FAST)  # anonymous credentials
    with pytest.raises(StorageAccessError, match=r"needs credentials that can sign .*\(URL_STYLE=signed\)$"):
        cannot.check_access()
    ResultStore(storage_client, bucket.name, retry=FAST).check_access()  # token URLs sign nothing
    can = ResultStore(
        storage_client, bucket.name, url_style="signed", retry=FAST, signing_credentials=signing_credentials()
    )
    can.check_access()


def test_signed_style_under_the_emulator_falls_back_to_the_emulator_url(storage_client, bucket, storage_emulator):
    store = ResultStore(storage_client, bucket.name, url_style="signed", retry=FAST, emulator_host=storage_emulator.url)
    [url] = store.upload("u", "f", "text2image", images(PNG))
    assert url == (
        f"{storage_emulator.url}/download/storage/v1/b/{bucket.name}/o/{quote('generating/u/image/f.png', safe='')}"
        "?alt=media"
    )
    assert fetch(url).content == PNG


# ---------------------------------------------------------------------------------------------- outages
def test_the_default_upload_retries_last_the_whole_retry_budget(monkeypatch):
    """A Storage audit: a Storage that refused at once (stopped, 503, 429) used up the default 5 tries in 8-9 s, so
    a 10 s blip failed a job after its GPU time, whatever UPLOAD_RETRY_MAX_SECONDS (60) said. The default tries'
    waits, even at their shortest (no jitter), add up to the budget: the time is what bounds them."""
    from types import SimpleNamespace

    monkeypatch.setenv("STORAGE_BUCKET", "bkt")
    for name in ("UPLOAD_RETRY_ATTEMPTS", "UPLOAD_RETRY_MAX_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    policy = RetryPolicy.from_settings(load_settings())
    backoff = policy.backoff()
    monkeypatch.setattr("random.uniform", lambda low, high: low)
    waits = [backoff(SimpleNamespace(attempt_number=n)) for n in range(1, policy.attempts)]
    assert sum(waits) >= policy.max_seconds == 60
    assert sum(waits[:-1]) < policy.max_seconds  # and no more tries than that takes


def test_claims_paused_for_storage_resume_on_an_answer_of_storages_own_only(monkeypatch):
    """A review: the pause ended on any error but a transient one, a failed credentials refresh included (claims
    resumed into the outage). Storage's own answer ends it, a refusal too (the next job meets it and says so)."""
    from google.api_core import exceptions as api_exceptions
    from google.auth.exceptions import RefreshError

    from listener import storage_outage

    monkeypatch.setattr(storage_outage, "FIRST_PROBE_SECONDS", 0.01)
    monkeypatch.setattr(storage_outage, "LONGEST_PROBE_SECONDS", 0.02)
    away, unavailable = RefreshError("the metadata server is away"), api_exceptions.ServiceUnavailable("503")
    answers = [away, unavailable, api_exceptions.Forbidden("no storage.objects.create")]
    probed: list[BaseException] = []

    def probe() -> None:
        probed.append(answers[min(len(probed), 2)])
        raise probed[-1]

    over = threading.Event()
    outage = storage_outage.StorageOutage(probe, over.set)
    outage.begin(ConnectionError("an upload failed past its retries"))
    assert outage.ongoing and over.wait(10)
    assert [type(e).__name__ for e in probed] == ["RefreshError", "ServiceUnavailable", "Forbidden"]
    assert not outage.ongoing


def test_upload_survives_a_short_storage_outage(storage_client, bucket, storage_emulator):
    retried = threading.Event()
    store = ResultStore(
        storage_client,
        bucket.name,
        emulator_host=storage_emulator.url,
        retry=RetryPolicy(attempts=1000, max_seconds=30, initial_wait=0.05, max_wait=0.2, request_timeout=5),
        on_retry=lambda name, attempt, exc: retried.set(),
    )
    result: dict = {}
    storage_emulator.stop()

    def upload():
        try:
            result["urls"] = store.upload("u", "f", "text2image", images(PNG, PNG2))
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    try:
        assert retried.wait(DEADLINE_S), "the upload never retried"
        assert "urls" not in result
    finally:
        storage_emulator.start()  # same port, same data folder: the bucket is still there
    thread.join(DEADLINE_S)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert [fetch(u).content for u in result["urls"]] == [PNG, PNG2]


def test_an_outage_past_the_retry_budget_is_a_connection_error(storage_client, bucket, storage_emulator):
    attempts = []
    store = ResultStore(
        storage_client,
        bucket.name,
        emulator_host=storage_emulator.url,
        retry=RetryPolicy(attempts=4, max_seconds=2, initial_wait=0.05, max_wait=0.1, request_timeout=1),
        on_retry=lambda name, attempt, exc: attempts.append(attempt),
    )
    storage_emulator.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            store.upload("u", "f", "text2image", images(PNG))
        assert time.monotonic() - started < 5
    finally:
        storage_emulator.start()
    assert attempts == [1, 2, 3]
    assert isinstance(info.value, ConnectionError)
    err = classify(info.value, during="upload")
    assert err.error_type == CONNECTION_ERROR
    assert "4 attempt(s)" in err.message and "generating/u/image/f.png" in err.message
    assert "http" not in err.message.lower() and "token" not in err.message.lower()


def test_a_hanging_server_times_out_within_the_budget(bucket):
    """A server that accepts connections and never answers: each request times out, the budget holds."""
    with socket.socket() as server:
        server.bind((emu.HOST, 0))
        server.listen(16)
        url = f"http://{emu.HOST}:{server.getsockname()[1]}"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
        store = ResultStore(
            client,
            bucket.name,
            emulator_host=url,
            retry=RetryPolicy(attempts=2, max_seconds=3, initial_wait=0.01, max_wait=0.01, request_timeout=0.3),
        )
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="timed out"):
            store.upload("u", "f", "text2image", images(PNG))
        assert time.monotonic() - started < 3


def test_a_hanging_server_is_tried_again_within_the_budget_the_settings_give(clean_env, bucket):
    """Chaos audit: with the default settings a request's timeout was the whole budget (60 s), so a Storage that
    hung got one request and no retry. A request now has a third of the budget."""
    with socket.socket() as server:
        server.bind((emu.HOST, 0))
        server.listen(16)
        url = f"http://{emu.HOST}:{server.getsockname()[1]}"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        clean_env.setenv("STORAGE_BUCKET", bucket.name)
        clean_env.setenv("STORAGE_EMULATOR_HOST", url)
        clean_env.setenv("UPLOAD_RETRY_MAX_SECONDS", "3")
        client = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
        store = ResultStore.from_settings(client, load_settings())
        with structlog.testing.capture_logs() as logs, pytest.raises(StorageUnavailable) as raised:
            store.upload("u", "f", "text2image", images(PNG))
        assert re.search(r"after [2-9] attempt\(s\)", str(raised.value)), raised.value
        assert [entry["event"] for entry in logs if entry["event"] == "upload_retry"]
    clean_env.delenv("UPLOAD_RETRY_MAX_SECONDS")
    assert RetryPolicy.from_settings(load_settings()).request_timeout == 20  # the default budget's third
    for budget, timeout in (("0.5", 1.0), ("3600", 60.0)):  # at least a second, at most a minute
        clean_env.setenv("UPLOAD_RETRY_MAX_SECONDS", budget)
        assert RetryPolicy.from_settings(load_settings()).request_timeout == timeout


def test_a_permanent_error_is_not_retried(storage_client, storage_emulator):
    calls = []
    store = ResultStore(
        storage_client,
        "no-such-bucket-" + emu.unique_id("x"),
        emulator_host=storage_emulator.url,
        retry=FAST,
        on_retry=lambda *a: calls.append(a),
    )
    with pytest.raises(StorageError) as info:
        store.upload("u", "f", "text2image", images(PNG))
    assert not isinstance(info.value, StorageUnavailable)
    assert calls == []
    assert classify(info.value).error_type == CONNECTION_ERROR


def test_transient_errors():
    from google.api_core import exceptions as gexc

    assert is_transient(requests.ConnectionError("x"))
    assert is_transient(requests.Timeout("x"))
    assert is_transient(ConnectionResetError())
    assert is_transient(gexc.ServiceUnavailable("x")) and is_transient(gexc.TooManyRequests("x"))
    assert is_transient(gexc.InternalServerError("x")) and is_transient(gexc.GatewayTimeout("x"))
    assert not is_transient(gexc.NotFound("x")) and not is_transient(gexc.Forbidden("x"))
    assert not is_transient(ValueError("x"))
    assert not is_transient(StorageUnavailable("x"))


def test_raw_client_library_network_errors_are_connection_errors():
    """A Firestore, Storage or auth call that fails on the network outside ResultStore's retries (a final write,
    a token refresh) raises the client library's own exception, no builtin ConnectionError: the job still ends
    `ConnectionError`, as the contract says for upload or storage failures, not `Exception`."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    raw = [
        gexc.ServiceUnavailable("backend down"),
        requests.ConnectionError("connection refused"),
        auth_exc.TransportError("token endpoint unreachable"),
    ]
    for exc in raw:
        err = classify(exc)
        assert (err.error_type, err.message) == (CONNECTION_ERROR, f"Upload or storage failure: {exc}"), exc


def test_a_library_error_naming_a_signed_or_token_url_leaves_its_query_out_of_the_jobs_message():
    """A job's `error_message` is the client's to read: a URL's query in a library's message (a V4 signature, a
    download token) must not reach it."""
    exc = requests.ConnectionError(
        "HTTPSConnectionPool(host='storage.googleapis.com', port=443): Max retries exceeded with url: "
        "/b/bucket/o/generating%2Fu%2Fimage%2Ff.png?X-Goog-Signature=abc123&X-Goog-Credential=sa%40p (reset)"
    )
    err = classify(exc)
    assert err.error_type == CONNECTION_ERROR and "abc123" not in err.message and "sa%40p" not in err.message
    assert "url: /b/bucket/o/generating%2Fu%2Fimage%2Ff.png?<query removed> (reset)" in err.message
    token = classify(RuntimeError("GET http://127.0.0.1:9199/o/f.png?alt=media&token=9f0e-secret failed"))
    assert "9f0e-secret" not in token.message and token.message.endswith("f.png?<query removed> failed")
    assert classify(ValueError("did you mean 'num_frames'?")).message.endswith("did you mean 'num_frames'?")
    unexpected = classify(OSError("GET http://h/o/f.png?alt=media&token=9f0e-secret failed"))  # the last branch
    assert "9f0e-secret" not in unexpected.message


# ---------------------------------------------------------------------------------------------- settings
SETTINGS_VARS = [
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "STORAGE_BUCKET",
    "FIRESTORE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "URL_STYLE",
    "SIGNED_URL_EXPIRY_SECONDS",
    "IMAGE_MODEL",
    "VIDEO_MODEL",
    "LEASE_SECONDS",
    "MAX_ATTEMPTS",
    "SWEEP_INTERVAL_SECONDS",
    "CONCURRENCY",
    "SHUTDOWN_GRACE_SECONDS",
    "UPLOAD_RETRY_ATTEMPTS",
    "UPLOAD_RETRY_MAX_SECONDS",
    "FIREGEN_OFFLOAD_TEXT_ENCODER",
    "FIREGEN_COMPILE",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in SETTINGS_VARS:
        monkeypatch.setenv(name, "")  # recorded: whatever the test or its code sets, undone after it
        monkeypatch.delenv(name)
    return monkeypatch


def test_settings_defaults(clean_env):
    clean_env.setenv("STORAGE_BUCKET", "bc-image-gen.firebasestorage.app")
    clean_env.setenv("GCLOUD_PROJECT", " bc-image-gen\n")  # pasted
    s = load_settings()
    assert s.storage_bucket == "bc-image-gen.firebasestorage.app" and s.google_cloud_project == "bc-image-gen"
    # Private by default: token URLs work with the default private bucket (and storage.rules keep applying).
    assert (s.url_style, s.lease_seconds, s.max_attempts, s.concurrency) == ("token", 120, 3, 1)
    assert (s.sweep_interval_seconds, s.shutdown_grace_seconds) == (10, 20)
    assert s.image_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert s.video_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert s.offload_text_encoder == "auto"


def test_settings_errors_name_the_variable(clean_env):
    with pytest.raises(SettingsError, match="^STORAGE_BUCKET is required$"):
        load_settings()
    clean_env.setenv("STORAGE_BUCKET", "bkt")
    clean_env.setenv("URL_STYLE", "presigned")
    with pytest.raises(SettingsError, match="^URL_STYLE must be one of public, signed, token$"):
        load_settings()
    clean_env.setenv("URL_STYLE", "Token")
    clean_env.setenv("LEASE_SECONDS", "0")
    with pytest.raises(SettingsError, match="^LEASE_SECONDS must be greater than 0"):
        load_settings()
    clean_env.setenv("LEASE_SECONDS", "60")
    clean_env.setenv("FIREGEN_OFFLOAD_TEXT_ENCODER", "sometimes")
    with pytest.raises(
        SettingsError,
        match="^FIREGEN_OFFLOAD_TEXT_ENCODER must be one of auto, on, off \\(or 1/0, true/false, yes/no\\)$",
    ):
        load_settings()
    clean_env.setenv("FIREGEN_OFFLOAD_TEXT_ENCODER", " TRUE ")
    assert load_settings().offload_text_encoder == "on"
    clean_env.setenv("FIREGEN_COMPILE", "fast")
    with pytest.raises(
        SettingsError, match="^FIREGEN_COMPILE must be one of auto, on, off \\(or 1/0, true/false, yes/no\\)$"
    ):
        load_settings()


def test_result_store_from_settings(clean_env, firestore_emulator, storage_emulator, bucket):
    clean_env.setenv("STORAGE_BUCKET", bucket.name)
    clean_env.setenv("GOOGLE_CLOUD_PROJECT", "demo-settings")
    clean_env.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host_port)
    # Without a scheme, as often set: the worker's URLs took it, and the storage library's client, built as the
    # worker builds it, took it as its base URL as it stood (a review: every upload refused, InvalidSchema).
    clean_env.setenv("STORAGE_EMULATOR_HOST", storage_emulator.host_port)
    clean_env.setenv("UPLOAD_RETRY_ATTEMPTS", "2")
    settings = load_settings()
    assert isinstance(settings, Settings)
    _, files = clients(settings)
    with structlog.testing.capture_logs() as logs:
        store = ResultStore.from_settings(files, settings)
    assert store.retry.attempts == 2 and store.url_style == "token" and logs == []
    # The default (token) style under the emulator: the emulator's download URL, which downloads as before.
    [url] = store.upload("u", "f", "text2image", images(PNG))
    assert url.startswith(f"{storage_emulator.url}/download/storage/v1/b/{bucket.name}/o/") and "&token=" in url
    assert fetch(url).content == PNG


def test_public_urls_are_warned_about_at_start_up(storage_client, clean_env):
    clean_env.setenv("STORAGE_BUCKET", "my-app.firebasestorage.app")
    clean_env.setenv("URL_STYLE", "public")
    clean_env.delenv("STORAGE_EMULATOR_HOST", raising=False)  # deployed: no emulator (the client is passed in)
    with structlog.testing.capture_logs() as logs:
        store = ResultStore.from_settings(storage_client, load_settings())
    assert store.url_style == "public"
    [warning] = logs
    assert warning["event"] == "public_urls" and warning["log_level"] == "warning"
    assert "world-readable" in warning["note"] and "storage.rules" in warning["note"]
    # Under the emulator every style gives the emulator's URL: nothing to warn about.
    clean_env.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9199")
    with structlog.testing.capture_logs() as logs:
        ResultStore.from_settings(storage_client, load_settings())
    assert logs == []


# ---------------------------------------------------------------------------------------------- start-up check
class GrantedOnly:
    """The bucket as IAM would answer for an account holding only `granted` (the emulator grants every
    permission it is asked about, and real IAM cannot run here: this stand-in answers testIamPermissions only;
    first with `failures` transient errors)."""

    def __init__(self, client, granted, failures=0):
        self.client, self.granted, self.failures, self.calls = client, set(granted), failures, 0

    def bucket(self, name):
        real, stand_in = self.client.bucket(name), self

        class Bucket:
            def test_iam_permissions(self, permissions, **kwargs):
                stand_in.calls += 1
                if stand_in.calls <= stand_in.failures:
                    from google.api_core.exceptions import ServiceUnavailable

                    raise ServiceUnavailable("try again")
                real.test_iam_permissions(permissions, **kwargs)  # the bucket exists (else NotFound)
                return [p for p in permissions if p in stand_in.granted]

        return Bucket()


def test_the_start_up_check_passes_on_a_bucket_the_worker_may_write(store):
    store.check_access()


def test_the_start_up_check_names_a_missing_bucket(storage_client, storage_emulator):
    store = ResultStore(storage_client, "no-such-bucket-here", retry=FAST, emulator_host=storage_emulator.url)
    with pytest.raises(StorageAccessError, match=r"^bucket no-such-bucket-here does not exist \(STORAGE_BUCKET\)$"):
        store.check_access()


def test_the_start_up_check_names_the_missing_permission_and_retries_transient_errors(storage_client, bucket):
    creator_only = GrantedOnly(storage_client, ["storage.objects.create"])
    with pytest.raises(StorageAccessError) as caught:
        ResultStore(creator_only, bucket.name, retry=FAST).check_access()
    assert str(caught.value) == (
        f"the worker's credentials may not write to bucket {bucket.name}: no storage.objects.delete, "
        "storage.objects.get (grant its service account roles/storage.objectUser on the bucket)"
    )
    flaky = GrantedOnly(storage_client, WRITE_PERMISSIONS, failures=2)
    ResultStore(flaky, bucket.name, retry=FAST).check_access()
    assert flaky.calls == 3


class DownloadAnswer:
    """What Firebase Storage's (or Cloud Storage's public) download endpoint answers, which cannot run here: the
    only stand-in. It records each URL asked for, and the probe object as the real bucket (the emulator) holds it
    then."""

    def __init__(self, bucket, answer):
        self.bucket, self.answer, self.asked = bucket, answer, []

    def __call__(self, url: str, timeout: float) -> int:
        name = unquote(urlparse(url).path.rsplit("/o/", 1)[-1]) if "/o/" in url else urlparse(url).path.split("/", 2)[2]
        blob = self.bucket.get_blob(name)
        self.asked.append(
            (url, name, (blob.metadata or {}) if blob else None, blob.download_as_bytes() if blob else b"")
        )
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("url_style", ["token", "public"])
def test_the_start_up_check_downloads_a_result_by_its_url_and_stops_on_a_refusal(storage_client, bucket, url_style):
    """The production review: token URLs are served by Firebase Storage, which needs the bucket linked to Firebase
    and its service agent allowed to read it (else HTTP 412 for every download), public ones by a world-readable
    bucket (else 403): jobs completed, every result's URL dead. One object is written, fetched by its URL as a
    client would, and deleted; a 4xx stops the start, naming what to do."""
    refusal = 412 if url_style == "token" else 403
    refused = DownloadAnswer(bucket, refusal)
    store = ResultStore(storage_client, bucket.name, url_style=url_style, retry=FAST, download_check=refused)
    with pytest.raises(StorageAccessError) as caught:
        store.check_access()
    said = str(caught.value)
    assert said.startswith(f"download URLs of bucket {bucket.name} do not work: a {url_style} URL answered ")
    assert f"HTTP {refusal} (URL_STYLE={url_style}: " in said
    assert ("link the bucket to Firebase" if url_style == "token" else "not world-readable") in said
    [(url, name, metadata, data)] = refused.asked
    assert name.startswith(results.DOWNLOAD_CHECK_PREFIX) and data == b"firegen download check"
    if url_style == "token":
        token = metadata[TOKEN_METADATA_KEY]
        assert url == f"{results.FIREBASE_BASE}/v0/b/{bucket.name}/o/{quote(name, safe='')}?alt=media&token={token}"
    else:
        assert url == f"{results.PUBLIC_BASE}/{bucket.name}/{name}"
    assert not list(bucket.list_blobs(prefix=results.DOWNLOAD_CHECK_PREFIX))  # the probe is gone
    served = DownloadAnswer(bucket, 200)
    ResultStore(storage_client, bucket.name, url_style=url_style, retry=FAST, download_check=served).check_access()
    assert len(served.asked) == 1 and not list(bucket.list_blobs(prefix=results.DOWNLOAD_CHECK_PREFIX))


def test_a_download_check_that_cannot_tell_lets_the_worker_start_and_says_so(storage_client, bucket):
    """Firebase Storage unreachable a moment, a 5xx, or a rate limit: no reason to keep a worker down whose jobs may
    well work."""
    tries = (
        (requests.ConnectionError("connection refused"), "connection failed"),
        (503, "HTTP 503"),
        (429, "HTTP 429"),
    )
    for answer, error in tries:
        with structlog.testing.capture_logs() as logs:
            check = DownloadAnswer(bucket, answer)
            ResultStore(storage_client, bucket.name, retry=FAST, download_check=check).check_access()
        [said] = [entry for entry in logs if entry["event"] == "download_check_inconclusive"]
        assert (said["error"], said["log_level"], len(check.asked)) == (error, "warning", 1)
    assert not list(bucket.list_blobs(prefix=results.DOWNLOAD_CHECK_PREFIX))


def test_download_status_is_the_answers_http_status():
    from fixtures_http import LocalServer, QuietHandler

    class Refusing(QuietHandler):
        def do_GET(self):
            self.reply(412 if "refused" in self.path else 200, {"error": {"code": 412}})

    server = LocalServer(Refusing)
    try:
        assert results.download_status(f"{server.origin}/v0/b/b/o/refused?alt=media", 5) == 412
        assert results.download_status(f"{server.origin}/v0/b/b/o/fine?alt=media", 5) == 200
    finally:
        server.close()


def test_a_worker_that_cannot_write_its_results_fails_its_fitness_check(
    firestore_client, storage_client, bucket, monkeypatch
):
    """Before: the worker started, and every job failed at its upload after its GPU time. The check runs on
    Cloud Storage only (the settings name no emulator here; the client still reaches the emulator, explicitly)."""
    from listener.worker import build_worker

    class Generator:
        def generate(self, request, progress=None):
            raise AssertionError("no job may run")

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    downloads = DownloadAnswer(bucket, 200)  # the one stand-in: see its doc
    monkeypatch.setattr(results, "download_status", downloads)
    settings = load_settings(storage_bucket=bucket.name)
    assert settings.storage_emulator_host is None
    fine = build_worker(settings, Generator(), firestore_client, storage_client, worker_id="fine")
    fine.fitness_check()
    assert fine.failure is None and len(downloads.asked) == 1  # a result's URL downloads
    assert fine.runner.results.server_time == fine.reconciler.server_time  # signed URLs dated by Firestore's clock
    missing = load_settings(storage_bucket="no-such-bucket-here")
    worker = build_worker(missing, Generator(), firestore_client, storage_client, worker_id="blind")
    with pytest.raises(StorageAccessError, match="^bucket no-such-bucket-here does not exist"):
        worker.fitness_check()
    assert (worker.failure, worker.exit_code) == ("fitness check failed: StorageAccessError", 1)


@pytest.mark.parametrize(
    "answer,said",
    [
        (
            "PermissionDenied",
            "the worker's credentials may not write Firestore of project {project} (grant its service account "
            "roles/datastore.user): Missing or insufficient permissions.",
        ),
        ("NotFound", "project {project} has no Firestore database (GOOGLE_CLOUD_PROJECT, or the key's project_id)"),
    ],
)
def test_a_worker_that_cannot_write_firestore_fails_its_fitness_check(
    firestore_client, storage_client, bucket, monkeypatch, answer, said
):
    """Before: the worker stayed up and idle, answering every request "Could not record the job in Firestore".
    Its first heartbeat is the check. The emulator lets every write through (there is no IAM to refuse one), so
    the heartbeat's write answers here as Firestore does for an account without access, or a project without a
    database; the rest is the real worker."""
    from google.api_core import exceptions

    from firegen_core import workers
    from listener.worker import FirestoreAccessError, build_worker

    class Generator:
        def generate(self, request, progress=None):
            raise AssertionError("no job may run")

    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST")
    settings = load_settings(storage_bucket=bucket.name)
    assert settings.firestore_emulator_host is None
    fine = build_worker(settings, Generator(), firestore_client, storage_client, worker_id="fine")
    fine.fitness_check()  # the heartbeat written (to the emulator, through the client built for it)
    assert firestore_client.document(f"{workers.WORKERS}/fine").get().exists

    def refused(*args, **kwargs):
        error = getattr(exceptions, answer)
        raise error("Missing or insufficient permissions." if answer == "PermissionDenied" else "no database")

    monkeypatch.setattr(workers, "beat", refused)
    worker = build_worker(settings, Generator(), firestore_client, storage_client, worker_id="blind")
    with pytest.raises(FirestoreAccessError) as caught:
        worker.fitness_check()
    assert str(caught.value) == said.format(project=firestore_client.project)
    assert (worker.failure, worker.exit_code) == ("fitness check failed: FirestoreAccessError", 1)
