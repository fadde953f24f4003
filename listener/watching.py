"""`on_snapshot` for the queue's windows, with a comparator of our own.

The Firestore client's Watch sorts each snapshot's docs (and each batch of changes) with the query's own
comparator, which encodes both docs' order values as protobuf messages for every comparison: a window of 120
queued docs cost ~24 ms of CPU (and of the GIL, which the generation's thread needs to launch its kernels) per
change heard, so a worker behind a backlog of a few hundred jobs spent most of a core in its listeners and heard
the queue tens of seconds late (a scale review). Comparing the order field's datetimes as Python values gives the
server's order at a small part of the cost (the library's own sorts a descending window ascending, its direction
taken as a factor, 2 for DESCENDING: nothing here reads the order).
`python -m bench.listeners` measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.cloud.firestore import Query
from google.cloud.firestore_v1.base_document import DocumentSnapshot
from google.cloud.firestore_v1.types import query as query_pb
from google.cloud.firestore_v1.watch import WATCH_TARGET_ID, Target, Watch

Comparator = Callable[[Any, Any], int]


def comparator(query: Query) -> Comparator:
    """The query's order, by one field: where both docs' values are datetimes, compared as Python values, ties by
    document path in the same direction (the server's implicit order by name); else the library's comparison (values
    of other types, which the windows' server timestamps never are)."""
    exact: Comparator = query._comparator
    orders = query._orders
    if len(orders) != 1:
        return exact
    field = orders[0].field.field_path
    sign = -1 if orders[0].direction == query_pb.StructuredQuery.Direction.DESCENDING else 1

    def compare(a: Any, b: Any) -> int:
        x, y = a._data.get(field), b._data.get(field)
        if not (isinstance(x, datetime) and isinstance(y, datetime)):
            return exact(a, b)
        if x == y and getattr(x, "nanosecond", 0) == getattr(y, "nanosecond", 0):
            x, y = a.reference._path, b.reference._path
        return 0 if x == y else sign if x > y else -sign

    return compare


def on_snapshot(query: Query, callback: Callable[..., None]) -> Watch:
    """`query.on_snapshot(callback)` (`Watch.for_query`), its snapshots sorted by `comparator(query)`."""
    parent_path, _ = query._parent._parent_info()
    target = Target.QueryTarget(parent=parent_path, structured_query=query._to_protobuf())
    return Watch(
        query,
        query._client,
        {"query": target._pb, "target_id": WATCH_TARGET_ID},
        comparator(query),
        callback,
        DocumentSnapshot,
    )
