"""storage.rules under the Firebase CLI's own Storage emulator, with real ID tokens from its Auth emulator, through
the Firebase Storage REST API the web SDK calls (`/v0/b/{bucket}/o/{quoted name}`, `Authorization: Firebase
<idToken>`). The PyPI Storage emulator the other tests use evaluates no rules.

The results are seeded as the worker writes them: listener.storage's ResultStore, through google-cloud-storage on
the emulator's Cloud Storage API, which (like the Admin SDK) the rules do not apply to. Each test seeds its own
objects, so a refused write or delete that the rules wrongly let through spoils no other test.

The emulator's rules runtime is scripts/storage_rules_runtime/ (Google's rules engine from the Firestore emulator
jar): the CLI's own is a download no package registry serves.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, quote, urlparse

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage  # type: ignore[attr-defined]

from devtools import emulators as emu
from devtools import firebase_cli
from devtools.firebase_cli import FirebaseCli
from firegen_core.contract import TEXT2IMAGE, TEXT2VIDEO
from listener.storage import ResultStore, RetryPolicy

pytestmark = pytest.mark.skipif(
    firebase_cli.missing_storage() is not None,
    reason=f"Firebase CLI Storage emulator: {firebase_cli.missing_storage()} (run `python3 scripts/setup_firebase_cli.py`)",
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)) * 10
MEDIA = {TEXT2IMAGE: (PNG, "png", "image/png"), TEXT2VIDEO: (MP4, "mp4", "video/mp4")}
FAST = RetryPolicy(attempts=2, max_seconds=10, initial_wait=0.01, max_wait=0.05, request_timeout=10)
TIMEOUT_S = 10


class Stack:
    """The CLI's Auth and Storage emulators, one bucket, two signed-in users, and the worker's result store."""

    def __init__(self, cli: FirebaseCli):
        self.cli = cli
        self.base = f"http://{cli.address('storage')}"
        self.bucket = f"{cli.project}.appspot.com"
        self.owner, self.owner_token = cli.sign_up("owner@example.com")
        self.stranger, self.stranger_token = cli.sign_up("stranger@example.com")
        # The worker's client under STORAGE_EMULATOR_HOST: anonymous, on the emulator's Cloud Storage API.
        self.client = storage.Client(
            project=cli.project, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.base}
        )
        self.store = ResultStore(self.client, self.bucket, url_style="token", retry=FAST, emulator_host=self.base)

    def token(self, who: str | None) -> str | None:
        return {"owner": self.owner_token, "stranger": self.stranger_token, None: None}[who]

    def seed(self, task_type: str, user: str | None = None) -> tuple[str, str]:
        """One result uploaded by the worker's own code: (object name, the URL it records on the job doc)."""
        data, ext, content_type = MEDIA[task_type]
        file_uid = uuid.uuid4().hex[:12]
        [url] = self.store.upload(user or self.owner, file_uid, task_type, [(data, ext, content_type)])
        folder = "image" if task_type == TEXT2IMAGE else "video"
        return f"generating/{user or self.owner}/{folder}/{file_uid}.{ext}", url

    def seed_admin(self, name: str, data: bytes = PNG) -> None:
        """An object anywhere, written as admin (`Bearer owner`, which the emulator lets past the rules)."""
        r = requests.post(
            f"{self.base}/v0/b/{self.bucket}/o",
            params={"name": name},
            data=data,
            headers={"Authorization": "Bearer owner", "Content-Type": "image/png"},
            timeout=TIMEOUT_S,
        )
        assert r.status_code == 200, r.text

    # Checks of what is stored go through the admin client, so they hold whatever the rules let users read.
    def exists(self, name: str) -> bool:
        return self.client.bucket(self.bucket).blob(name).exists()

    def stored(self, name: str) -> tuple[bytes, dict | None]:
        """(bytes, custom metadata) of an object."""
        blob = self.client.bucket(self.bucket).blob(name)
        data = blob.download_as_bytes()
        blob.reload()
        return data, blob.metadata

    # ------------------------------------------------------------------ the web SDK's requests
    def _headers(self, who: str | None) -> dict[str, str]:
        token = self.token(who)
        return {"Authorization": f"Firebase {token}"} if token else {}

    def object_url(self, name: str) -> str:
        return f"{self.base}/v0/b/{self.bucket}/o/{quote(name, safe='')}"

    def metadata(self, who: str | None, name: str) -> requests.Response:  # getMetadata()
        return requests.get(self.object_url(name), headers=self._headers(who), timeout=TIMEOUT_S)

    def media(self, who: str | None, name: str) -> requests.Response:  # getBytes() / getBlob()
        return requests.get(
            self.object_url(name), params={"alt": "media"}, headers=self._headers(who), timeout=TIMEOUT_S
        )

    def upload(self, who: str | None, name: str, data: bytes = b"not yours") -> requests.Response:  # uploadBytes()
        boundary = uuid.uuid4().hex
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=utf-8\r\n\r\n"
                f"{json.dumps({'name': name, 'contentType': 'image/png'})}\r\n"
                f"--{boundary}\r\nContent-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--".encode()
        )
        headers = {
            **self._headers(who),
            "X-Goog-Upload-Protocol": "multipart",
            "Content-Type": f"multipart/related; boundary={boundary}",
        }
        return requests.post(
            f"{self.base}/v0/b/{self.bucket}/o", params={"name": name}, data=body, headers=headers, timeout=TIMEOUT_S
        )

    def update_metadata(self, who: str | None, name: str) -> requests.Response:  # updateMetadata()
        return requests.patch(
            self.object_url(name),
            json={"customMetadata": {"by": str(who)}},
            headers=self._headers(who),
            timeout=TIMEOUT_S,
        )

    def delete(self, who: str | None, name: str) -> requests.Response:  # deleteObject()
        return requests.delete(self.object_url(name), headers=self._headers(who), timeout=TIMEOUT_S)

    def list(self, who: str | None, prefix: str) -> requests.Response:  # list() / listAll()
        return requests.get(
            f"{self.base}/v0/b/{self.bucket}/o",
            params={"prefix": prefix, "delimiter": "/"},
            headers=self._headers(who),
            timeout=TIMEOUT_S,
        )


@pytest.fixture(scope="module")
def stack(emulator_logs, tmp_path_factory):
    cli = FirebaseCli(
        emulator_logs,
        tmp_path_factory.mktemp("storage-rules"),
        emu.unique_id("demo-srules"),
        "http://127.0.0.1:9/unused",  # no functions run here
        emulators=("storage", "auth"),
    )
    cli.start()
    try:
        yield Stack(cli)
    finally:
        cli.stop()


def refused(response: requests.Response) -> bool:
    """A rules denial. Anything else that is no success (a 400 from a malformed request, a 404) would pass for a
    denial, so it fails the test instead."""
    if response.status_code == 403:
        return True
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return False


# ---------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("task_type", [TEXT2IMAGE, TEXT2VIDEO])
def test_the_owner_reads_metadata_and_bytes(stack, task_type):
    name, _ = stack.seed(task_type)
    data, _, content_type = MEDIA[task_type]
    meta = stack.metadata("owner", name)
    assert meta.status_code == 200, meta.text
    assert (meta.json()["name"], meta.json()["contentType"], int(meta.json()["size"])) == (
        name,
        content_type,
        len(data),
    )
    media = stack.media("owner", name)
    assert media.status_code == 200, media.text
    assert media.content == data


@pytest.mark.parametrize("task_type", [TEXT2IMAGE, TEXT2VIDEO])
@pytest.mark.parametrize("who", ["stranger", None])
def test_another_user_and_no_token_are_refused(stack, task_type, who):
    name, _ = stack.seed(task_type)
    assert refused(stack.metadata(who, name))
    assert refused(stack.media(who, name))


# ---------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("who", ["owner", "stranger", None])
def test_nobody_uploads_under_generating_not_even_the_owner(stack, who):
    existing, _ = stack.seed(TEXT2IMAGE)
    new = f"generating/{stack.owner}/image/{uuid.uuid4().hex[:12]}.png"
    assert refused(stack.upload(who, new))
    assert refused(stack.upload(who, existing))  # an overwrite of a result
    assert not stack.exists(new)
    assert stack.stored(existing)[0] == PNG


@pytest.mark.parametrize("who", ["owner", "stranger", None])
def test_nobody_updates_metadata_or_deletes_under_generating(stack, who):
    name, _ = stack.seed(TEXT2VIDEO)
    assert refused(stack.update_metadata(who, name))
    assert refused(stack.delete(who, name))
    data, metadata = stack.stored(name)
    assert data == MP4
    assert "by" not in (metadata or {})


@pytest.mark.parametrize("who", ["owner", "stranger", None])
def test_nothing_outside_generating_is_readable_or_writable(stack, who):
    outside = [
        f"{uuid.uuid4().hex[:8]}.png",
        f"uploads/{stack.owner}/{uuid.uuid4().hex[:8]}.png",
        f"{stack.owner}/image/{uuid.uuid4().hex[:8]}.png",
    ]
    for name in outside:
        stack.seed_admin(name)
        assert refused(stack.metadata(who, name)), name
        assert refused(stack.media(who, name)), name
        assert refused(stack.upload(who, name)), name
        assert refused(stack.delete(who, name)), name
        assert stack.exists(name), name
    fresh = f"uploads/{stack.owner}/{uuid.uuid4().hex[:8]}.png"
    assert refused(stack.upload(who, fresh))
    assert not stack.exists(fresh)


# ---------------------------------------------------------------------------------------------- listing
def test_listing_another_users_folder_is_refused_and_the_owner_lists_only_their_own(stack):
    """`read` covers `list`: under rules_version 2 `{allPaths=**}` also matches the folder itself, so the owner
    may list generating/{uid}/ (their own results), and nobody may list anyone else's or the folders above."""
    image, _ = stack.seed(TEXT2IMAGE)
    stack.seed(TEXT2IMAGE, user=stack.stranger)
    own = stack.list("owner", f"generating/{stack.owner}/image/")
    assert own.status_code == 200, own.text
    assert image in [item["name"] for item in own.json()["items"]]
    assert all(item["name"].startswith(f"generating/{stack.owner}/") for item in own.json()["items"])
    for who in ("stranger", None):
        assert refused(stack.list(who, f"generating/{stack.owner}/")), who
        assert refused(stack.list(who, f"generating/{stack.owner}/image/")), who
    for who in ("owner", "stranger", None):
        assert refused(stack.list(who, "generating/")), who
        assert refused(stack.list(who, "")), who


# ---------------------------------------------------------------------------------------------- token URLs
@pytest.mark.parametrize("task_type", [TEXT2IMAGE, TEXT2VIDEO])
def test_the_download_token_the_worker_records_opens_its_object_with_no_auth(stack, task_type):
    """README (URL_STYLE=token): Firebase download URLs work on a private bucket. A request that carries the
    object's download token is let through without rules; another token, or another object's, is not."""
    name, recorded = stack.seed(task_type)
    token = parse_qs(urlparse(recorded).query)["token"][0]
    data = MEDIA[task_type][0]
    # The URL as the worker records it under an emulator (the emulator's download path) serves the result.
    assert requests.get(recorded, timeout=TIMEOUT_S).content == data
    # The deployed form, https://firebasestorage.googleapis.com/v0/b/{bucket}/o/{name}?alt=media&token=...
    as_deployed = requests.get(stack.object_url(name), params={"alt": "media", "token": token}, timeout=TIMEOUT_S)
    assert as_deployed.status_code == 200, as_deployed.text
    assert as_deployed.content == data
    _, other_url = stack.seed(task_type)
    other_token = parse_qs(urlparse(other_url).query)["token"][0]
    for wrong in (str(uuid.uuid4()), other_token):
        r = requests.get(stack.object_url(name), params={"alt": "media", "token": wrong}, timeout=TIMEOUT_S)
        assert refused(r)


def test_make_devs_worker_records_the_url_the_web_sdk_gives_and_it_opens_with_no_auth(stack):
    """make dev's worker has FIREBASE_STORAGE_EMULATOR_HOST too: its token URL is Firebase's on this emulator
    (`/v0/b/...`, what getDownloadURL() gives here, and what ref(storage, url) reads); a plain GET opens it, and
    the same URL with another token is refused."""
    store = ResultStore(
        stack.client,
        stack.bucket,
        url_style="token",
        retry=FAST,
        emulator_host=stack.base,
        firebase_emulator_host=stack.cli.address("storage"),
    )
    file_uid = uuid.uuid4().hex[:12]
    [url] = store.upload(stack.owner, file_uid, TEXT2IMAGE, [(PNG, "png", "image/png")])
    name = f"generating/{stack.owner}/image/{file_uid}.png"
    token = parse_qs(urlparse(url).query)["token"][0]
    assert url == f"{stack.object_url(name)}?alt=media&token={token}"
    assert requests.get(url, timeout=TIMEOUT_S).content == PNG
    assert refused(requests.get(url.replace(token, str(uuid.uuid4())), timeout=TIMEOUT_S))
    assert stack.media("owner", name).content == PNG


# ---------------------------------------------------------------------------------------------- path tricks
@pytest.mark.parametrize("via", ["{me}/../{them}", "{me}/image/../../{them}", "{me}/./../{them}"])
def test_a_dot_dot_path_under_ones_own_folder_does_not_reach_another_users_results(stack, via):
    """Security audit, on this emulator: `generating/{me}/../{them}/image/x.png` matched the rule with uid = me, and
    the emulator resolved the `..` and served the other user's object."""
    name, _ = stack.seed(TEXT2IMAGE, user=stack.stranger)
    rest = name.removeprefix(f"generating/{stack.stranger}/")
    trick = f"generating/{via.format(me=stack.owner, them=stack.stranger)}/{rest}"
    assert refused(stack.metadata("owner", trick))
    assert refused(stack.media("owner", trick))
    listed = stack.list("owner", f"generating/{via.format(me=stack.owner, them=stack.stranger)}/image/")
    # Refused, not merely empty: this emulator lists such a prefix literally (no `..` resolved, so nothing found),
    # and an empty answer would not tell a rule that refuses `..` from one that lets it through.
    assert refused(listed)
    assert stack.stored(name)[0] == PNG
    # Nor does it tell which names exist there; the owner's own missing object is still a plain 404.
    assert refused(stack.metadata("owner", trick.replace(rest, "nothing-here.png")))
    assert stack.metadata("owner", f"generating/{stack.owner}/image/nothing-here.png").status_code == 404


# ---------------------------------------------------------------------------------------------- the dev client
def test_several_clients_signing_in_as_one_new_user_at_once_all_get_in(stack):
    """Found running five `make submit`s at once: each signs in as the dev user, the Auth emulator did not know it
    yet, all signed it up, and all but the first got EMAIL_EXISTS ("the stack does not answer"). On this module's
    Auth emulator: clients started together on a new user all sign in, as that one user."""
    auth = stack.cli.address("auth")
    for n in range(3):
        email = f"together-{n}@example.com"
        start = threading.Barrier(6)

        def sign_in(email: str = email, start: threading.Barrier = start) -> str:
            start.wait(timeout=TIMEOUT_S)
            return firebase_cli.sign_in(auth, email)[0]

        with ThreadPoolExecutor(6) as pool:
            uids = [f.result(timeout=TIMEOUT_S * 3) for f in [pool.submit(sign_in) for _ in range(6)]]
        assert len(set(uids)) == 1 and uids[0]


def test_the_emulators_objects_are_kept_in_this_runs_folder_not_the_machines_tmp(stack):
    """Found running `make test` as a user other than the one who ran it before: the CLI's Storage emulator keeps
    its objects in os.tmpdir()/firebase/storage/blobs, which the earlier user's run (root) had made, and it failed
    to start (EACCES, "An unexpected error has occurred"). Its TMPDIR is a folder of this run's own."""
    name, _ = stack.seed(TEXT2IMAGE)
    blobs = stack.cli.workdir / "tmp" / "firebase" / "storage" / "blobs"
    assert any(path.read_bytes() == PNG for path in blobs.rglob("*") if path.is_file()), sorted(blobs.rglob("*"))
    assert stack.media("owner", name).content == PNG


def test_the_rules_runtime_writes_nothing_the_cli_logs_as_an_error(stack):
    """Java 24 and later warn on stderr at protobuf's first use of sun.misc.Unsafe; the CLI logged those lines as
    "Unexpected rules runtime error" at every start (a fresh clone's make dev, JDK 25). A rule decided, then its
    log holds none."""
    name, _ = stack.seed(TEXT2IMAGE)
    assert stack.media("owner", name).content == PNG and refused(stack.media("stranger", name))
    said = stack.cli._this_start().decode(errors="replace")
    assert "All emulators ready" in said and "Unexpected rules runtime error" not in said, said
