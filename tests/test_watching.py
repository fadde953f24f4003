"""listener.watching: the queue windows' `on_snapshot` with a comparator of our own, on the real emulator.

Its order must be the query's, which the server's results give: the same docs, in the same order, as the library's
own comparator, with ties of `created_at` (a batch's docs share one server timestamp) and values of other types.
"""

from __future__ import annotations

import functools
import random
import threading
from datetime import UTC, datetime

import pytest
from google.cloud.firestore import SERVER_TIMESTAMP, FieldFilter, Query

from listener import watching

TIMEOUT_S = 20


@pytest.fixture
def queued_docs(firestore_client):
    """46 docs under two users: 20 written one by one, 20 in one batch (one `created_at` for all), and 6 whose
    `created_at` an admin wrote by hand (two equal datetimes, a string, a number, a null, a map)."""
    docs = firestore_client.collection("generations")
    for i in range(20):
        docs.document(f"u{i % 2}/images/single-{i:02d}").set({"status": "queued", "created_at": SERVER_TIMESTAMP})
    batch = firestore_client.batch()
    for i in range(20):
        batch.set(docs.document(f"u{i % 2}/images/batch-{i:02d}"), {"status": "queued", "created_at": SERVER_TIMESTAMP})
    batch.commit()
    odd = [datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01", 5, None, {"a": 1}]
    for i, value in enumerate(odd):
        docs.document(f"u{i % 2}/images/odd-{i}").set({"status": "queued", "created_at": value})
    return firestore_client.collection_group("images")


@pytest.mark.parametrize("direction", [Query.ASCENDING, Query.DESCENDING])
def test_its_order_is_the_servers(queued_docs, direction):
    """The server's order, ties of `created_at` by name in the query's direction; values of other types in the
    library's order (which takes DESCENDING for ascending: a `created_at` a client cannot write)."""
    query = queued_docs.order_by("created_at", direction=direction)
    served = list(query.get())
    assert len(served) == 46
    times = [doc for doc in served if isinstance(doc.get("created_at"), datetime)]
    assert len(times) == 42
    ours = functools.cmp_to_key(watching.comparator(query))
    first = sorted(served, key=ours)
    for _ in range(20):
        assert sorted(random.sample(served, len(served)), key=ours) == first  # a total order
        assert [d.id for d in sorted(random.sample(times, len(times)), key=ours)] == [d.id for d in times]
    if direction == Query.ASCENDING:
        assert [d.id for d in first] == [d.id for d in served]
        assert first == sorted(served, key=functools.cmp_to_key(query._comparator))


def test_its_snapshots_hold_the_querys_window_in_order_and_hear_changes(queued_docs, firestore_client):
    query = queued_docs.where(filter=FieldFilter("status", "==", "queued")).order_by("created_at").limit(30)
    heard: list[list[str]] = []
    changed = threading.Condition()

    def on_snapshot(docs, changes, read_time):
        with changed:
            heard.append([doc.id for doc in docs])
            changed.notify_all()

    watch = watching.on_snapshot(query, on_snapshot)
    try:
        expected = [doc.id for doc in query.get()]
        with changed:
            assert changed.wait_for(lambda: heard and heard[-1] == expected, TIMEOUT_S)
        firestore_client.document("generations/u0/images/single-00").update({"status": "processing"})
        expected = [doc.id for doc in query.get()]
        assert "single-00" not in expected and len(expected) == 30
        with changed:
            assert changed.wait_for(lambda: heard[-1] == expected, TIMEOUT_S)
    finally:
        watch.unsubscribe()
