"""firestore.rules on the real Firestore emulator, through its REST API as a client SDK would call it.

Each case is one request made as a user: `Authorization: Bearer <unsigned JWT>` (the emulator accepts
`alg: none` tokens, which is what the client SDKs' `mockUserToken` sends), or no header at all. Documents
the cases read, update or delete are seeded as admin (`Bearer owner`, which bypasses rules).

Create cases that are about the request's parameters also say what the contract (firegen_core/contract.py
parse_document) decides for the same document. The rules never refuse what the contract accepts, and let in
what it refuses (within their bounds: scalars, text of at most 10,000 UTF-16 units in a prompt, 100 in another
field), so that the worker fails
such a doc with the contract's own message, which its client then reads on the doc: refused by the rules, the
contract's client sample (setDoc, then the callable) saw only "Missing or insufficient permissions" for a bad
option (the contract audit of session 12).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from fixtures_requests import request_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firegen_core import contract
from firegen_core.contract import ContractError, parse_document

RULES = Path(__file__).resolve().parent.parent / "firestore.rules"
OWNER, STRANGER = "alice", "bob"
SERVER_TIME = object()  # the client SDK's serverTimestamp(): a REQUEST_TIME transform
ALLOW, DENY = True, False


# ---------------------------------------------------------------------------------------------- REST client
def mock_token(uid: str) -> str:
    """An unsigned ID token for the emulator: header {"alg": "none"}, payload with the uid, no signature."""

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    now = int(datetime.now(UTC).timestamp())
    payload = {
        "iss": "https://securetoken.google.com/demo-rules",
        "aud": "demo-rules",
        "iat": now,
        "exp": now + 3600,
        "auth_time": now,
        "sub": uid,
        "user_id": uid,
        "firebase": {"sign_in_provider": "custom", "identities": {}},
    }
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def encode(value: Any) -> dict:
    if value is None:
        return {"nullValue": None}
    if isinstance(value, bool):
        return {"booleanValue": value}
    if isinstance(value, int):
        return {"integerValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, datetime):
        return {"timestampValue": value.isoformat().replace("+00:00", "Z")}
    if isinstance(value, list):
        return {"arrayValue": {"values": [encode(v) for v in value]}}
    if isinstance(value, dict):
        return {"mapValue": {"fields": {k: encode(v) for k, v in value.items()}}}
    raise TypeError(type(value))


class Rest:
    """The emulator's Firestore REST API for one project, as one user (uid) or unauthenticated (None)."""

    def __init__(self, base_url: str, project: str):
        self.root = f"projects/{project}/databases/(default)/documents"
        self.url = f"{base_url}/v1/{self.root}"
        self.session = requests.Session()

    def _headers(self, uid: str | None) -> dict:
        if uid is None:
            return {}
        return {"Authorization": f"Bearer {'owner' if uid == 'admin' else mock_token(uid)}"}

    def commit(self, uid: str | None, path: str, data: dict, *, update: bool = False) -> requests.Response:
        fields = {k: encode(v) for k, v in data.items() if v is not SERVER_TIME}
        write: dict[str, Any] = {"update": {"name": f"{self.root}/{path}", "fields": fields}}
        transforms = [{"fieldPath": k, "setToServerValue": "REQUEST_TIME"} for k, v in data.items() if v is SERVER_TIME]
        if transforms:
            write["updateTransforms"] = transforms
        if update:  # updateDoc: only the given fields, the doc must exist
            write["updateMask"] = {"fieldPaths": list(data)}
            write["currentDocument"] = {"exists": True}
        return self.session.post(f"{self.url}:commit", json={"writes": [write]}, headers=self._headers(uid), timeout=10)

    def seed(self, docs: dict[str, dict]) -> None:
        """Write docs as admin (`Bearer owner`: rules do not apply), in one commit."""
        writes = [
            {"update": {"name": f"{self.root}/{path}", "fields": {k: encode(v) for k, v in data.items()}}}
            for path, data in docs.items()
        ]
        response = self.session.post(
            f"{self.url}:commit", json={"writes": writes}, headers=self._headers("admin"), timeout=10
        )
        assert response.status_code == 200, response.text

    def get(self, uid: str | None, path: str) -> requests.Response:
        return self.session.get(f"{self.url}/{path}", headers=self._headers(uid), timeout=10)

    def delete(self, uid: str | None, path: str) -> requests.Response:
        return self.session.delete(f"{self.url}/{path}", headers=self._headers(uid), timeout=10)

    def collection_group(self, uid: str | None, collection: str) -> requests.Response:
        query = {"structuredQuery": {"from": [{"collectionId": collection, "allDescendants": True}]}}
        return self.session.post(f"{self.url}:runQuery", json=query, headers=self._headers(uid), timeout=10)


def allowed(response: requests.Response) -> bool:
    if response.status_code == 200:
        return True
    assert response.status_code in (403, 400), (response.status_code, response.text[:500])
    if response.status_code == 400:  # an invalid request would pass for a "deny"; only rules denials count
        pytest.fail(f"malformed test request: {response.text[:500]}")
    return False


# ---------------------------------------------------------------------------------------------- the cases
def sample(**options) -> dict:
    """The contract's client sample: setDoc(docRef, {status, created_at, prompt, generated, error, ...options})."""
    return {
        "status": "queued",
        "created_at": SERVER_TIME,
        "prompt": "A red sports car on a mountain road",
        "generated": False,
        "error": False,
        **options,
    }


@dataclass
class Create:
    name: str
    data: dict
    expect: bool
    uid: str | None = OWNER
    path: str = f"generations/{OWNER}/images/file-1"
    contract: bool | None = None  # what parse_document says about the same doc; None: not a parameter case


VIDEO_OPTIONS = dict(numFrames=16, fps=8, videoWidth=512, videoHeight=512, videoGuidanceScale=5.0)
VIDEO_PATH = f"generations/{OWNER}/videos/file-1"

CREATES = [
    Create("client sample as written", sample(), ALLOW, contract=True),
    Create(
        "client sample with camelCase video options", sample(**VIDEO_OPTIONS), ALLOW, path=VIDEO_PATH, contract=True
    ),
    Create(
        "camelCase image options",
        sample(
            numImagesPerPrompt=2,
            numInferenceSteps=30,
            guidanceScale=7.5,
            negativePrompt="blurry",
            width=768,
            height=512,
            seed=42,
        ),
        ALLOW,
        contract=True,
    ),
    Create(
        "snake_case fields and ids equal to the path",
        sample(
            num_images_per_prompt=4,
            num_inference_steps=50,
            guidance_scale=20,
            negative_prompt=None,
            seed=None,
            width=1024,
            height=256,
            user_id=OWNER,
            file_uid="file-1",
            use_cloud_storage=True,
        ),
        ALLOW,
        contract=True,
    ),
    Create(
        "snake_case video bounds",
        sample(num_frames=81, fps=15, video_width=1024, video_height=256, video_guidance_scale=1.0),
        ALLOW,
        path=VIDEO_PATH,
        contract=True,
    ),
    Create(
        "same field in both spellings, same value",
        sample(num_frames=24, numFrames=24),
        ALLOW,
        path=VIDEO_PATH,
        contract=True,
    ),
    Create("unauthenticated", sample(), DENY, uid=None),
    Create("into another user's path", sample(), DENY, uid=STRANGER),
    Create("forged status completed", {**sample(), "status": "completed"}, DENY),
    Create("forged status processing", {**sample(), "status": "processing"}, DENY),
    Create("generated true", {**sample(), "generated": True}, DENY),
    Create("error true", {**sample(), "error": True}, DENY),
    Create(
        "forged result fields", sample(images=["https://x/y.png"], image_url="https://x/y.png", image_count=1), DENY
    ),
    Create("forged worker fields", sample(worker_id="w1", attempts=0, lease_expires_at=datetime.now(UTC)), DENY),
    Create("forged dispatch marker", sample(dispatch_count=1), DENY),
    Create("forged quota admission", sample(quota_admitted=True, cost=0.0), DENY),
    Create(
        "owner creates own usage doc", {"running": 0, "pending": 0, "spent_today": 0.0}, DENY, path=f"usage/{OWNER}"
    ),
    Create("created_at from the client clock", {**sample(), "created_at": datetime(2025, 7, 23, tzinfo=UTC)}, DENY),
    Create("created_at missing", {k: v for k, v in sample().items() if k != "created_at"}, DENY),
    Create("unknown field", sample(foo="bar"), DENY),
    Create("prompt missing", {k: v for k, v in sample().items() if k != "prompt"}, ALLOW, contract=False),
    Create("prompt blank", sample(prompt="   "), ALLOW, contract=False),
    Create("prompt not a string", sample(prompt=123), ALLOW, contract=False),
    Create("prompt too long", sample(prompt="x" * 2001), ALLOW, contract=False),
    Create("width above 1024", sample(width=2048), ALLOW, contract=False),
    Create("height below 256", sample(height=128), ALLOW, contract=False),
    Create("width not a multiple of 8", sample(width=500), ALLOW),
    Create("width as a string", sample(width="512"), ALLOW, contract=False),
    Create("numImagesPerPrompt 5", sample(numImagesPerPrompt=5), ALLOW, contract=False),
    Create("num_inference_steps 9", sample(num_inference_steps=9), ALLOW, contract=False),
    Create("guidanceScale 25.0", sample(guidanceScale=25.0), ALLOW, contract=False),
    Create("guidance_scale as a string", sample(guidance_scale="7.5"), ALLOW, contract=False),
    Create("seed as a string", sample(seed="42"), ALLOW, contract=False),
    Create("numFrames 100", sample(numFrames=100), ALLOW, path=VIDEO_PATH, contract=False),
    Create("num_frames not an integer", sample(num_frames=16.5), ALLOW, path=VIDEO_PATH, contract=False),
    Create("fps 5", sample(fps=5), ALLOW, path=VIDEO_PATH, contract=False),
    Create("videoWidth not a multiple of 16", sample(videoWidth=520), ALLOW, path=VIDEO_PATH),
    Create("videoWidth odd", sample(videoWidth=521), ALLOW, path=VIDEO_PATH, contract=False),
    Create("videoGuidanceScale 0.5", sample(videoGuidanceScale=0.5), ALLOW, path=VIDEO_PATH, contract=False),
    Create("video field on an image job", sample(numFrames=16), ALLOW, contract=False),
    Create(
        "same field in both spellings, two values",
        sample(num_frames=16, numFrames=24),
        ALLOW,
        path=VIDEO_PATH,
        contract=False,
    ),
    Create("user_id naming someone else", sample(user_id=STRANGER), DENY),
    Create("file_uid other than the doc id", sample(file_uid="file-2"), DENY),
    Create("use_cloud_storage false", sample(use_cloud_storage=False), ALLOW, contract=False),
    Create("media type other than images or videos", sample(), DENY, path=f"generations/{OWNER}/audio/file-1"),
    Create(
        "document id the contract refuses", sample(), DENY, path=f"generations/{OWNER}/images/file 1", contract=False
    ),
    Create("document id starting with ~", sample(), DENY, path=f"generations/{OWNER}/images/~file-1", contract=False),
    Create(
        "document id with ~ after its first letter",
        sample(),
        ALLOW,
        path=f"generations/{OWNER}/images/f~1",
        contract=True,
    ),
    # The README's promises, case by case (issue #15 item 8).
    Create("camelCase fileUid other than the doc id", sample(fileUid="file-2"), DENY),
    Create("camelCase userId naming someone else", sample(userId=STRANGER), DENY),
    Create("camelCase ids that match", sample(fileUid="file-1", userId=OWNER), ALLOW, contract=True),
    # The rules fuzz: empty ids name none (the contract reads them as left out) and were refused.
    Create("empty ids", sample(user_id="", fileUid=""), ALLOW, contract=True),
    Create(
        "document id of 129 characters", sample(), DENY, path=f"generations/{OWNER}/images/{'a' * 129}", contract=False
    ),
    Create(
        "document id of 128 characters", sample(), ALLOW, path=f"generations/{OWNER}/images/{'a' * 128}", contract=True
    ),
    Create("seed as a float", sample(seed=4.5), ALLOW, contract=False),
    Create("negativePrompt not a string", sample(negativePrompt=7), ALLOW, contract=False),
    Create("negativePrompt too long", sample(negativePrompt="x" * 2001), ALLOW, contract=False),
    Create("numImagesPerPrompt 0", sample(numImagesPerPrompt=0), ALLOW, contract=False),
    Create("prompt of 2,000 characters", sample(prompt="x" * 2000), ALLOW, contract=True),
    # The security audit: size() counts UTF-16 units (an emoji is 2), strip() more spaces than RE2's \s.
    Create("prompt of 2,000 emoji", sample(prompt="\U0001f697" * 2000), ALLOW, contract=True),
    Create("prompt of 2,001 emoji", sample(prompt="\U0001f697" * 2001), ALLOW, contract=False),
    Create("negativePrompt of 2,000 emoji", sample(negativePrompt="\U0001f697" * 2000), ALLOW, contract=True),
    Create(
        "prompt of 1,000 emoji and 1,001 letters",
        sample(prompt="\U0001f697" * 1000 + "x" * 1001),
        ALLOW,
        contract=False,
    ),
    Create("prompt of no-break spaces", sample(prompt="\u00a0\u00a0"), ALLOW, contract=False),
    Create("prompt of a vertical tab and ideographic spaces", sample(prompt="\x0b\u3000\u2003"), ALLOW, contract=False),
    Create("prompt of one letter among Unicode spaces", sample(prompt="\u00a0a\u3000"), ALLOW, contract=True),
    Create("unknown media path", sample(), DENY, path=f"generations/{OWNER}/gifs/file-1"),
    # What the rules bound: a doc holds scalars and text of at most 10,000 UTF-16 units.
    Create("prompt of 10,000 characters", sample(prompt="x" * 10_000), ALLOW, contract=False),
    Create("prompt of 10,001 characters", sample(prompt="x" * 10_001), DENY),
    Create("width as a list", sample(width=[512]), DENY),
    Create("guidanceScale as a map", sample(guidanceScale={"value": 7.5}), DENY),
    Create("seed as text of 10,001 characters", sample(seed="9" * 10_001), DENY),
    Create("width as text of 100 characters", sample(width="9" * 100), ALLOW, contract=False),
    Create("width as text of 101 characters", sample(width="9" * 101), DENY),
]


@pytest.fixture(scope="module")
def rules_emulator(firestore_emulator_factory):
    return firestore_emulator_factory(rules=RULES)


@pytest.fixture
def rest(rules_emulator, project_id) -> Rest:
    rules_emulator.ensure_running()
    return Rest(rules_emulator.url, project_id)


def contract_accepts(path: str, data: dict) -> bool:
    _, uid, media, file_uid = path.split("/")
    try:
        parse_document(uid, media, file_uid, data)  # state fields (status, created_at, ...) are skipped
        return True
    except ContractError:
        return False


@pytest.mark.parametrize("case", CREATES, ids=[c.name for c in CREATES])
def test_create(rest, case: Create):
    assert allowed(rest.commit(case.uid, case.path, case.data)) is case.expect
    if case.contract is not None:
        assert contract_accepts(case.path, case.data) is case.contract
        assert case.expect or not case.contract, "the rules refuse what the contract accepts"
    if case.expect:  # what landed is what was sent, with the server's time
        doc = rest.get("admin", case.path).json()["fields"]
        assert doc["status"] == {"stringValue": "queued"} and "timestampValue" in doc["created_at"]


# Every request field the rules pass through bounded(), written out (not read from the rules: a field whose bound
# was dropped there must still be tried here).
BOUNDED = [
    "prompt",
    "seed",
    "width",
    "height",
    "fps",
    "use_cloud_storage",
    "useCloudStorage",
    "negative_prompt",
    "negativePrompt",
    "num_images_per_prompt",
    "numImagesPerPrompt",
    "num_inference_steps",
    "numInferenceSteps",
    "guidance_scale",
    "guidanceScale",
    "num_frames",
    "numFrames",
    "video_width",
    "videoWidth",
    "video_height",
    "videoHeight",
    "video_guidance_scale",
    "videoGuidanceScale",
]


# Text of at most 10,000 UTF-16 units in a prompt; 100 in any other field (the contract wants a number or a boolean
# there, and refuses any text with its message).
TEXT_FIELDS = {"prompt", "negative_prompt", "negativePrompt"}


def _units_allowed(name: str) -> int:
    return 10_000 if name in TEXT_FIELDS else 100


@pytest.mark.parametrize("name", BOUNDED)
def test_every_request_field_is_bounded(rest, name):
    """Each field holds a scalar or text of at most its bound: a character more, or a list, is refused (an
    unbounded field would let a client store a megabyte per doc that every worker then reads; a review: 10,000
    units in each of 23 fields let in 0.7 MB)."""
    path, bound = f"generations/{OWNER}/images/{{}}", _units_allowed(name)
    assert allowed(rest.commit(OWNER, path.format("at-bound"), sample(**{name: "x" * bound})))
    assert not allowed(rest.commit(OWNER, path.format("long"), sample(**{name: "x" * (bound + 1)})))
    assert not allowed(rest.commit(OWNER, path.format("list"), sample(**{name: ["x"]})))


def _as_a_client_sdk_writes(value: Any) -> Any:
    """A client SDK writes a lone UTF-16 surrogate as U+FFFD (Firestore holds UTF-8 text)."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


ID_FIELDS = {"user_id": "userId", "file_uid": "fileUid"}


def _camel(name: str) -> str:
    """The client sample's spelling of a request field (numFrames)."""
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


@st.composite
def _client_docs(draw) -> tuple[str, dict]:
    """A job doc as any client may write it: the sample's state fields and any request fields, in either spelling
    (or both), of any value, text around the rules' bound included; ids of the path's, another's, or none."""
    media = draw(st.sampled_from(["images", "videos"]))
    file_uid = f"fuzz-{uuid.uuid4().hex}"
    around_bound = st.builds(
        lambda c, n: c * n,
        st.sampled_from(["x", "\N{GRINNING FACE}"]),
        st.sampled_from([50, 51, 99, 100, 101, 4999, 5000, 5001, 9999, 10_000, 10_001]),
    )
    data = sample()
    del data["prompt"]
    for name in draw(st.lists(st.sampled_from(sorted(contract.PARAMETER_FIELDS | {"use_cloud_storage"})), unique=True)):
        for spelling in draw(st.sampled_from([[name], [_camel(name)], [name, _camel(name)]])):
            value = draw(st.one_of(request_value(name), around_bound).map(_as_a_client_sdk_writes))
            data[spelling] = value
    for name, camel in ID_FIELDS.items():
        own = OWNER if name == "user_id" else file_uid
        for spelling in draw(st.lists(st.sampled_from([name, camel]), unique=True)):
            data[spelling] = draw(st.sampled_from([own, STRANGER, None, "", 7]))  # "": none (the rules fuzz)
    return f"generations/{OWNER}/{media}/{file_uid}", data


def _names_another_id(path: str, data: dict) -> bool:
    """The doc names a user or file id other than its path's (the contract reads the ids from the path alone;
    the rules refuse a doc that claims another's)."""
    _, uid, _, file_uid = path.split("/")
    own = {"user_id": uid, "userId": uid, "file_uid": file_uid, "fileUid": file_uid}
    return any(data.get(name) not in (None, "") and data[name] != id_ for name, id_ in own.items())


def _within_the_rules_bounds(data: dict) -> bool:
    """Every request field a scalar, or text of at most its bound (`_units_allowed`)."""
    request = {k: v for k, v in data.items() if k not in ("status", "created_at", "generated", "error")}
    return all(
        v is None or isinstance(v, int | float | bool) or (isinstance(v, str) and _utf16_units(v) <= _units_allowed(k))
        for k, v in request.items()
    )


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_client_docs())
def test_the_rules_let_in_any_doc_within_their_bounds_and_every_doc_the_contract_accepts(rest, doc):
    """Property, on docs drawn at random: a client's create (the sample's state fields) is allowed exactly where
    its request fields are within the rules' bounds and it claims no other id than its path's; a doc the contract
    accepts is never refused but for such a claim (the rules bound what a doc holds; its contract is the
    worker's to check, with its message)."""
    path, data = doc
    let_in = allowed(rest.commit(OWNER, path, data))
    claims_another = _names_another_id(path, data)
    assert let_in is (_within_the_rules_bounds(data) and not claims_another)
    assert let_in or claims_another or not contract_accepts(path, data), "the rules refuse a doc the contract accepts"


def test_a_document_id_like_x_is_refused_by_firestore_and_the_contract(rest):
    """`__x__` ids: the rules' validId refuses them, but Firestore itself refuses them first (reserved), before
    any rule runs; the contract refuses them too."""
    path = f"generations/{OWNER}/images/__x__"
    response = rest.commit(OWNER, path, sample())
    assert response.status_code == 400 and "reserved" in response.text
    assert contract_accepts(path, sample()) is False


# ---------------------------------------------------------------------------------------------- reads, updates
JOB = f"generations/{OWNER}/images/file-1"
USAGE = f"usage/{OWNER}"
TOMBSTONE = f"generations/{OWNER}/deleted_jobs/images-file-0"  # firegen_core.jobs.tombstone_ref
DONE = {
    "status": "completed",
    "generated": True,
    "error": False,
    "prompt": "a car",
    "images": ["https://example.invalid/a.png"],
    "image_url": "https://example.invalid/a.png",
    "image_count": 1,
}
USED = {
    "running": 1,
    "pending": 2,
    "spent_today": 12.5,
    "day": "2026-11-27",
    "limits": {"max_running": 2, "max_pending": 20, "daily_budget": 600.0},
}


@dataclass
class Access:
    name: str
    action: str  # get | list | group | update | set | delete
    uid: str | None
    expect: bool
    path: str = JOB
    data: dict = field(default_factory=dict)


ACCESS = [
    Access("owner reads own job", "get", OWNER, ALLOW),
    Access("owner reads own video job", "get", OWNER, ALLOW, path=f"generations/{OWNER}/videos/file-9"),
    Access("stranger reads someone's job", "get", STRANGER, DENY),
    Access("unauthenticated read", "get", None, DENY),
    Access("owner lists own images", "list", OWNER, ALLOW, path=f"generations/{OWNER}/images"),
    Access("stranger lists someone's images", "list", STRANGER, DENY, path=f"generations/{OWNER}/images"),
    Access("stranger lists someone's videos", "list", STRANGER, DENY, path=f"generations/{OWNER}/videos"),
    Access("owner lists own videos", "list", OWNER, ALLOW, path=f"generations/{OWNER}/videos"),
    Access("collection-group read across users", "group", OWNER, DENY, path="images"),
    Access("collection-group read, unauthenticated", "group", None, DENY, path="images"),
    Access("owner forges completion", "update", OWNER, DENY, data={"status": "completed", "generated": True}),
    Access("owner edits the prompt", "update", OWNER, DENY, data={"prompt": "something else"}),
    Access("owner overwrites with a fresh queued doc", "set", OWNER, DENY, data=sample()),
    Access("owner resets a failed job to queued", "update", OWNER, DENY, data={"status": "queued", "error": False}),
    Access("owner deletes own job", "delete", OWNER, DENY),
    Access("stranger deletes someone's job", "delete", STRANGER, DENY),
    Access(
        "owner edits a video job's URL",
        "update",
        OWNER,
        DENY,
        path=f"generations/{OWNER}/videos/file-9",
        data={"video_url": "https://evil.invalid/x.mp4"},
    ),
    Access("owner reads own usage", "get", OWNER, ALLOW, path=USAGE),
    Access("stranger reads someone's usage", "get", STRANGER, DENY, path=USAGE),
    Access("unauthenticated usage read", "get", None, DENY, path=USAGE),
    Access("owner lists all usage", "list", OWNER, DENY, path="usage"),
    Access("owner resets own spend", "update", OWNER, DENY, path=USAGE, data={"spent_today": 0.0}),
    Access("owner raises own limits", "update", OWNER, DENY, path=USAGE, data={"limits": {"max_pending": 999}}),
    Access("owner overwrites own usage", "set", OWNER, DENY, path=USAGE, data={"running": 0, "pending": 0}),
    Access("owner deletes own usage", "delete", OWNER, DENY, path=USAGE),
    # A deleted job's tombstone (README "Deletion"): the Admin SDK's alone, its owner's included.
    Access("owner reads own deleted job's tombstone", "get", OWNER, DENY, path=TOMBSTONE),
    Access("owner lists own tombstones", "list", OWNER, DENY, path=f"generations/{OWNER}/deleted_jobs"),
    Access("owner clears own tombstone", "delete", OWNER, DENY, path=TOMBSTONE),
    Access("owner writes a tombstone", "set", OWNER, DENY, path=TOMBSTONE, data={"dispatched_inputs": []}),
]


@pytest.mark.parametrize("case", ACCESS, ids=[c.name for c in ACCESS])
def test_access(rest, case: Access):
    rest.seed(
        {
            **{
                path: DONE
                for path in (JOB, f"generations/{OWNER}/videos/file-9", f"generations/{STRANGER}/images/file-b")
            },
            USAGE: USED,
            TOMBSTONE: {"dispatched_inputs": ["0123abcd"], "arrived_dispatches": []},
        }
    )
    before = rest.get("admin", case.path).json() if case.action in ("update", "set", "delete") else None
    if case.action == "get" or case.action == "list":
        response = rest.get(case.uid, case.path)
    elif case.action == "group":
        response = rest.collection_group(case.uid, case.path)
    elif case.action == "update":
        response = rest.commit(case.uid, case.path, case.data, update=True)
    elif case.action == "set":
        response = rest.commit(case.uid, case.path, case.data)
    else:
        response = rest.delete(case.uid, case.path)
    assert allowed(response) is case.expect
    if before is not None:  # a denied write changed nothing
        assert rest.get("admin", case.path).json()["fields"] == before["fields"]


def monitoring_query(rest: Rest, uid: str | None, owner: str, where: list[dict], order: list | None = None):
    """A query on `owner`'s images, as the contract's monitoring samples make it (query(collection(db,
    'generations', userId, 'images'), where(...), orderBy(...))), run as `uid`."""
    query: dict[str, Any] = {"from": [{"collectionId": "images"}]}
    filters = [{"fieldFilter": f} for f in where]
    query["where"] = filters[0] if len(filters) == 1 else {"compositeFilter": {"op": "AND", "filters": filters}}
    if order:
        query["orderBy"] = order
    return rest.session.post(
        f"{rest.url}/generations/{owner}:runQuery",
        json={"structuredQuery": query},
        headers=rest._headers(uid),
        timeout=10,
    )


def test_the_contracts_monitoring_queries_work_for_the_signed_in_user_alone(rest):
    """README: "active generations" and "stuck jobs" work for the signed-in user on their own collection."""
    now = datetime.now(UTC)
    old, recent = now - timedelta(minutes=10), now - timedelta(minutes=1)
    jobs = {
        "queued-old": {**QUEUED_JOB, "created_at": old, "modified": old},
        "queued-new": {**QUEUED_JOB, "created_at": recent, "modified": recent},
        "stuck": {**RUNNING_JOB, "created_at": old - timedelta(seconds=1), "modified": old},
        "moving": {**RUNNING_JOB, "created_at": old - timedelta(minutes=1), "modified": recent},
        "done": {**DONE, "created_at": now, "modified": now},
    }
    rest.seed({f"generations/{OWNER}/images/{name}": data for name, data in jobs.items()})
    rest.seed({f"generations/{STRANGER}/images/theirs": {**RUNNING_JOB, "created_at": old, "modified": old}})

    def status(*values: str) -> dict:
        if len(values) == 1:
            return {"field": {"fieldPath": "status"}, "op": "EQUAL", "value": encode(values[0])}
        return {"field": {"fieldPath": "status"}, "op": "IN", "value": encode(list(values))}

    active = ([status("queued", "processing")], [{"field": {"fieldPath": "created_at"}, "direction": "DESCENDING"}])
    five_minutes_ago = {
        "field": {"fieldPath": "modified"},
        "op": "LESS_THAN",
        "value": encode(now - timedelta(minutes=5)),
    }
    stuck = ([status("processing"), five_minutes_ago], None)
    for (where, order), expected in ((active, ["queued-new", "queued-old", "stuck", "moving"]), (stuck, ["stuck"])):
        response = monitoring_query(rest, OWNER, OWNER, where, order)
        assert response.status_code == 200, response.text[:500]
        names = [row["document"]["name"].rsplit("/", 1)[1] for row in response.json() if "document" in row]
        assert names == expected if order else sorted(names) == expected, names
        assert not allowed(monitoring_query(rest, STRANGER, OWNER, where, order))  # not someone else's
        assert not allowed(monitoring_query(rest, None, OWNER, where, order))


# ---------------------------------------------------------------------------------------------- cancellation
QUEUED_JOB = {"status": "queued", "generated": False, "error": False, "prompt": "a car", "user_id": OWNER}
RUNNING_JOB = {**QUEUED_JOB, "status": "processing", "worker_id": "w1", "attempts": 1, "progress": 0.5}
FAILED_JOB = {**QUEUED_JOB, "status": "failed", "error": True, "error_type": "RuntimeError", "error_message": "x"}
CANCEL = {"cancel_requested": True}


@dataclass
class Cancel:
    name: str
    uid: str | None
    seeded: dict  # the job doc as it stands
    data: dict  # the client's updateDoc fields
    expect: bool


CANCELS = [
    Cancel("owner cancels own queued job", OWNER, QUEUED_JOB, CANCEL, ALLOW),
    Cancel("owner cancels own running job", OWNER, RUNNING_JOB, CANCEL, ALLOW),
    Cancel("owner cancels a job already asked to cancel", OWNER, {**RUNNING_JOB, **CANCEL}, CANCEL, ALLOW),
    Cancel("owner cancels a completed job", OWNER, DONE, CANCEL, DENY),
    Cancel("owner cancels a failed job", OWNER, FAILED_JOB, CANCEL, DENY),
    Cancel("stranger cancels someone's queued job", STRANGER, QUEUED_JOB, CANCEL, DENY),
    Cancel("unauthenticated cancel", None, QUEUED_JOB, CANCEL, DENY),
    Cancel("owner sets cancel_requested false", OWNER, QUEUED_JOB, {"cancel_requested": False}, DENY),
    Cancel("owner sets cancel_requested to a string", OWNER, QUEUED_JOB, {"cancel_requested": "yes"}, DENY),
    Cancel("owner cancels and fails the job", OWNER, RUNNING_JOB, {**CANCEL, "status": "failed"}, DENY),
    Cancel("owner cancels and edits progress", OWNER, RUNNING_JOB, {**CANCEL, "progress": 1.0}, DENY),
    Cancel("owner cancels and edits the prompt", OWNER, QUEUED_JOB, {**CANCEL, "prompt": "other"}, DENY),
]


@pytest.mark.parametrize("case", CANCELS, ids=[c.name for c in CANCELS])
def test_cancel_update(rest, case: Cancel):
    rest.seed({JOB: case.seeded})
    before = rest.get("admin", JOB).json()["fields"]
    assert allowed(rest.commit(case.uid, JOB, case.data, update=True)) is case.expect
    after = rest.get("admin", JOB).json()["fields"]
    if case.expect:  # exactly the one field changed
        assert after == {**before, "cancel_requested": {"booleanValue": True}}
    else:
        assert after == before


@pytest.mark.parametrize("uid", [OWNER, None])
def test_clients_cannot_touch_worker_liveness_docs(rest, uid):
    rest.seed({"workers/w1": {"busy": 1}})
    assert allowed(rest.get(uid, "workers/w1")) is False
    assert allowed(rest.commit(uid, "workers/w1", {"busy": 0})) is False
    assert allowed(rest.commit(uid, "workers/w2", {"busy": 0})) is False
    assert allowed(rest.delete(uid, "workers/w1")) is False
    assert rest.get("admin", "workers/w1").json()["fields"] == {"busy": {"integerValue": "1"}}
