"""`python -m bench.listeners`: the CPU a worker's queue listeners spend per change they hear, behind a backlog.

On the Firestore emulator: 300 queued image docs of 30 users; the oldest-100 and newest-20 windows the worker
listens to (listener.listeners), opened with the client library's `on_snapshot` and with ours
(listener.watching); then 300 docs are admitted and claimed (two writes each) and the process's CPU time is
measured until the listeners have heard them all. The writes' own CPU is measured with no listener open. The
emulator sends a limited query's whole window again at each change (~100 document messages a write, where Firestore
sends the one that changed), so the per-change figures are the emulator's; the sort of one snapshot's 120 docs, which
the client does at each change either way, is timed on its own.
"""

from __future__ import annotations

import functools
import random
import resource
import tempfile
import threading
import time
from pathlib import Path

from google.cloud.firestore import SERVER_TIMESTAMP, FieldFilter, Query

from devtools import emulators as emu
from listener import watching

DOCS = 300


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(firestore: emu.FirestoreEmulator, project: str, listen) -> tuple[float, float]:
    """(CPU seconds, wall seconds) from the first write until the listeners went quiet."""
    db = firestore.client(project)
    for i in range(DOCS):
        db.document(f"generations/u{i % 30}/images/j{i:03d}").set(
            {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "x"}
        )
    queued = db.collection_group("images").where(filter=FieldFilter("status", "==", "queued"))
    heard = threading.Event()
    watches = [
        listen(queued.order_by("created_at", direction=direction).limit(limit), lambda *_: heard.set())
        for direction, limit in ((Query.ASCENDING, 100), (Query.DESCENDING, 20))
        if listen is not None
    ]
    if watches:
        heard.wait(30)
    time.sleep(1.0)
    start, began = _cpu(), time.monotonic()
    for i in range(DOCS):
        ref = db.document(f"generations/u{i % 30}/images/j{i:03d}")
        ref.update({"quota_admitted": True})
        ref.update({"status": "processing"})
    last = _cpu()
    while True:  # until the listeners' threads have caught up: a second with no CPU to speak of
        time.sleep(1.0)
        now = _cpu()
        if now - last < 0.05:
            break
        last = now
    for watch in watches:
        watch.unsubscribe()
    db.close()
    return _cpu() - start, time.monotonic() - began


def _sorts(firestore: emu.FirestoreEmulator, project: str) -> None:
    """Microseconds to sort one snapshot's docs (the oldest-100 window and the newest-20: 120), shuffled."""
    db = firestore.client(project)
    query = db.collection_group("images").order_by("created_at").limit(120)
    docs = list(query.get())
    for label, compare in (
        ("library comparator", query._comparator),
        ("listener.watching", watching.comparator(query)),
    ):
        key = functools.cmp_to_key(compare)
        rounds, began = 200, time.perf_counter()
        for _ in range(rounds):
            assert sorted(random.sample(docs, len(docs)), key=key) == docs
        print(f"sorting {len(docs)} docs, {label}: {(time.perf_counter() - began) / rounds * 1e6:.0f} us")
    db.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        firestore = emu.FirestoreEmulator(Path(tmp))
        firestore.start()
        try:
            writes, _ = _run(firestore, "bench-none", None)
            print(f"{2 * DOCS} writes, no listener: {writes:.1f} s CPU")
            for label, listen in (
                ("library on_snapshot", lambda query, callback: query.on_snapshot(callback)),
                ("listener.watching", watching.on_snapshot),
            ):
                cpu, wall = _run(firestore, f"bench-{label.split()[0].replace('.', '-')}", listen)
                per_change = (cpu - writes) / (2 * DOCS) * 1000
                print(
                    f"{label}: {cpu:.1f} s CPU ({per_change:.1f} ms a change heard), quiet {wall:.1f} s after the first write"
                )
            _sorts(firestore, "bench-library")
        finally:
            firestore.stop()


if __name__ == "__main__":
    main()
