"""Where a job's results lie in Cloud Storage, and how they are removed: the worker writes them
(listener/storage.py), and the worker and the functions remove them (a cancelled job's partial upload, a job
its owner deleted).

    text2image: generating/{user_id}/image/{file_uid}.png, {file_uid}_1.png, {file_uid}_2.png, ...
    text2video: generating/{user_id}/video/{file_uid}.mp4

Such a name can belong to two jobs of one user: `x_1.png` is image 1 of job `x` and image 0 of job `x_1`. Every
object therefore names its job in its metadata (`firegen_file_uid`), and a job that finds one of its names owned
by another job writes `{file_uid}!{index}.{ext}` instead (`alternate_name`); removing a job's results deletes
only what it owns, never by prefix (which would match other jobs). An object without that metadata (written
before it existed) counts as the job's own.
"""

from __future__ import annotations

import re
import time
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.storage.retry import DEFAULT_RETRY

from .contract import PARAMS, TEXT2IMAGE, TEXT2VIDEO

FOLDER = {TEXT2IMAGE: "image", TEXT2VIDEO: "video"}
_BUCKET_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?")


def bucket_name_problem(name: str) -> str | None:
    """What STORAGE_BUCKET must be where `name` is not a bucket's name alone, else None. Said where the setting is
    read: a URL or a path started the worker, and every job then failed after its GPU time, at upload (a review);
    the functions deleted a deleted job's files nowhere."""
    if name.startswith("gs://") or "/" in name:
        return "a bucket's name alone, without gs:// or a path (e.g. my-app.firebasestorage.app)"
    if not _BUCKET_NAME.fullmatch(name):
        return "a bucket's name: lowercase letters, digits, - _ and ., starting and ending with a letter or a digit"
    # Cloud Storage's own limits: such a name was told as a bucket that does not exist (the workers' start-up
    # check), or not at all (the functions' deletes).
    if not 3 <= len(name) <= (222 if "." in name else 63) or any(len(part) > 63 for part in name.split(".")):
        return "a bucket's name: 3 to 63 characters, or up to 222 with dots and at most 63 between two dots"
    return None


DEFAULT_FORMAT = {TEXT2IMAGE: ("png", "image/png"), TEXT2VIDEO: ("mp4", "video/mp4")}
OWNER_METADATA_KEY = "firegen_file_uid"  # the job (of the folder's user) that wrote the object
# Between a file_uid and the index in an alternate name: a file_uid never holds it (firegen_core.contract's
# _ID_PATTERN), so no normal name, and no other job's alternate, can equal one. It is legal in object names,
# quotes to %21 in URLs, and needs no escaping in a shell or a gsutil/gcloud path, unlike `#`, `?`, `*` or `[`.
ALTERNATE_MARK = "!"


def check_part(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or not value.isprintable():
        raise ValueError(f"{name} {value!r} cannot be part of an object name")
    return value


def most(task_type: str) -> int:
    """The most result objects a job of `task_type` may have."""
    return int(PARAMS["num_images_per_prompt"].high) if task_type == TEXT2IMAGE else 1


def _name(user_id: str, file_uid: str, task_type: str, tail: str, ext: str | None) -> str:
    if task_type not in FOLDER:
        raise ValueError(f"unknown task_type {task_type!r}")
    ext = check_part("ext", (ext or DEFAULT_FORMAT[task_type][0]).lstrip("."))
    if ALTERNATE_MARK in check_part("file_uid", file_uid):
        raise ValueError(f"file_uid {file_uid!r} cannot hold {ALTERNATE_MARK!r}: alternate names would collide")
    return f"generating/{check_part('user_id', user_id)}/{FOLDER[task_type]}/{file_uid}{tail}.{ext}"


def object_name(user_id: str, file_uid: str, task_type: str, index: int = 0, ext: str | None = None) -> str:
    """The name of a job's `index`-th result object (index 0 has no suffix)."""
    if index < 0:
        raise ValueError("index must be >= 0")
    return _name(user_id, file_uid, task_type, f"_{index}" if index else "", ext)


def alternate_name(user_id: str, file_uid: str, task_type: str, index: int = 0, ext: str | None = None) -> str:
    """Where a job's `index`-th result goes when another job of the same user owns `object_name`: as
    deterministic (a retry finds the other job's object again, and writes here again), and this job's alone."""
    if index < 0:
        raise ValueError("index must be >= 0")
    return _name(user_id, file_uid, task_type, f"{ALTERNATE_MARK}{index}", ext)


def is_contested(file_uid: str, task_type: str, index: int) -> bool:
    """Whether another job of the same user could own this job's `index`-th name: every suffixed name, and an
    unsuffixed one whose file_uid ends like a suffix (`x_1.png`: image 0 of `x_1` and image 1 of `x`). Only
    these names are checked before an upload, so the common single-image job costs no extra request."""
    return index >= 1 or any(file_uid.endswith(f"_{i}") for i in range(1, most(task_type)))


def owner(blob: Any) -> str | None:
    return (blob.metadata or {}).get(OWNER_METADATA_KEY)


class OutOfTime(TimeoutError):
    """A removal's time ran out before its last request (`Budget`)."""


class Budget:
    """The time a removal's requests may take, each request's timeout and retry cut to what is left of it; None:
    each request as `timeout` and the library's default retry say (the worker's clean-ups)."""

    def __init__(self, timeout: float, seconds: float | None = None):
        self.timeout = timeout
        self.until = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.until is not None and time.monotonic() >= self.until

    def call(self) -> dict[str, Any]:
        """The `timeout` and `retry` of the next request; OutOfTime once the budget is spent."""
        if self.until is None:
            return {"timeout": self.timeout, "retry": DEFAULT_RETRY}
        left = self.until - time.monotonic()
        if left <= 0:
            raise OutOfTime("Storage did not answer in time")
        return {"timeout": min(self.timeout, left), "retry": DEFAULT_RETRY.with_timeout(left)}


def remove(
    bucket: Any, user_id: str, file_uid: str, task_type: str, indices: range, budget: Budget, *, strict: bool = False
) -> int:
    """Delete the job's result objects of `indices` from `bucket` (a google-cloud-storage Bucket): the
    deterministic names it owns, and its alternates. Returns how many existed. A contested name without owner
    metadata (written before it existed) counts as the job's own, unless `strict`."""
    removed = 0
    ours = (file_uid,) if strict else (None, file_uid)
    for index in indices:
        name = object_name(user_id, file_uid, task_type, index)
        if is_contested(file_uid, task_type, index):
            removed += delete_object(bucket, alternate_name(user_id, file_uid, task_type, index), budget)
            found = bucket.get_blob(name, **budget.call())
            if found is None or owner(found) not in ours:  # another job's result
                continue
        removed += delete_object(bucket, name, budget)
    return removed


def delete_object(bucket: Any, name: str, budget: Budget) -> int:
    """1 when the object existed and is deleted, 0 when there was none."""
    try:
        bucket.blob(name).delete(**budget.call())
        return 1
    except api_exceptions.NotFound:
        return 0
