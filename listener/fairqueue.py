"""The worker's in-memory candidate jobs, handed out fairly: round-robin across users, oldest first within one.

Pure (no Firestore): the reconciler feeds it from its listeners and sweep and takes the next job from it.

- Fair order: the next job belongs to the user served longest ago (a user never served by this worker comes
  first; ties go to the user whose oldest job is oldest), and is that user's oldest job (`created_at`). So a
  user with 50 queued jobs and a user with 1 alternate: the one job waits for at most one of the other's.
- "First" entries (a dead worker's job, found by the sweep once its lease ran out) go before everything: they
  were started once already, so they are older than anything queued since.
- Bounded: at most `capacity` entries whatever the backlog. When full, the newest entry of the user holding the
  most entries makes room (or the new entry is dropped, when it would be that entry itself, or when every user
  holds one: a user's only entry gives way to a "first" alone). A dropped entry is
  still a queued doc: the listeners and the sweep offer it again once it is among the oldest.
- Batches (`pop_batch`): a candidate may carry a group (its batch key); the next job, then more of its group, each
  the next in fair order among the group's candidates, at most `per_user` of one user.
- Deferred candidates (`not_before`, seconds since the epoch) are held in their place but handed out only from
  then on; `ready_at` says when the next one is. A key offered again without a deferral is ready at once.
- Held candidates (`where`, a predicate of the key: the worker's model for them still loading) keep their place
  and are passed over, by `ready_at` as by `pop_batch`, until `where` takes them.
- `served` remembers at most `memory` users (least recently served forgotten first).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

DEFAULT_CAPACITY = 1000
MILLISECONDS_FROM = 1e11  # a numeric created_at past this counts milliseconds since the epoch
K = TypeVar("K", bound=Hashable)


@dataclass(order=True)
class _Entry(Generic[K]):
    created: float
    seq: int
    key: K = field(compare=False)
    user: str = field(compare=False)
    first: bool = field(compare=False, default=False)
    group: Hashable | None = field(compare=False, default=None)
    not_before: float = field(compare=False, default=0.0)


def timestamp(value: object, default: float) -> float:
    """A created_at as seconds since the epoch (a Firestore timestamp is a datetime); `default` when unknown or
    unreadable (an admin's `created_at: "yesterday"` raised in a listener's callback, which killed the listener)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        # Milliseconds (an Admin SDK's `Date.now()` or `currentTimeMillis()`): read as seconds, the job was dated
        # 50,000 years ahead and went after every other (a review). Seconds pass 1e11 in the year 5138.
        return float(value) / 1000 if abs(value) > MILLISECONDS_FROM else float(value)
    return default


class FairQueue(Generic[K]):
    def __init__(self, capacity: int = DEFAULT_CAPACITY, memory: int = 10 * DEFAULT_CAPACITY):
        if capacity < 1 or memory < 1:
            raise ValueError("capacity and memory must be >= 1")
        self.capacity = capacity
        self.memory = memory
        self._entries: dict[K, _Entry[K]] = {}
        self._by_user: dict[str, list[_Entry[K]]] = {}  # each sorted oldest first
        self._served: OrderedDict[str, int] = OrderedDict()  # user -> tick of their last job handed out
        self._ticks = itertools.count(1)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def users(self) -> int:
        return len(self._by_user)

    def oldest(self, user: str, where: Callable[[K], bool] = lambda key: True) -> float | None:
        """The `created` of the user's oldest entry whose key is `where`; None when the user has none."""
        return next((entry.created for entry in self._by_user.get(user, ()) if where(entry.key)), None)

    def add(
        self,
        key: K,
        user: str,
        created: float,
        *,
        first: bool = False,
        group: Hashable | None = None,
        not_before: float = 0.0,
    ) -> bool:
        """Offer a candidate; True if it is held. A key already held keeps its place (it may only become first,
        or ready sooner). `group`: candidates of one group may be handed out together (`pop_batch`); None: always
        alone. `not_before`: not handed out before this time."""
        held = self._entries.get(key)
        if held is not None:
            held.first |= first
            held.group = held.group if group is None else group
            held.not_before = min(held.not_before, not_before)
            return True
        if len(self._entries) >= self.capacity and not self._make_room(user, created, first):
            return False
        entry = _Entry(created, next(self._seq), key, user, first, group, not_before)
        self._entries[key] = entry
        bisect.insort(self._by_user.setdefault(user, []), entry)
        return True

    def discard(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entries = self._by_user[entry.user]
        entries.remove(entry)
        if not entries:
            del self._by_user[entry.user]

    def clear(self) -> None:
        self._entries.clear()
        self._by_user.clear()

    def ready_at(self, where: Callable[[K], bool] | None = None) -> float | None:
        """When the next candidate (whose key is `where`) may be handed out (a past time: now); None when none is
        held."""
        entries = self._entries.values()
        return min((entry.not_before for entry in entries if where is None or where(entry.key)), default=None)

    def pop(self, spread: int = 1) -> K | None:
        """The next job in fair order and take it out (None when empty). With `spread` > 1, one of the first
        `spread` users in fair order at random: idle workers that all heard of the same jobs then go for
        different ones instead of racing for one."""
        batch = self.pop_batch(1, spread)
        return batch[0] if batch else None

    def pop_batch(
        self,
        size: int,
        spread: int = 1,
        per_user: int | None = None,
        now: float | None = None,
        where: Callable[[K], bool] | None = None,
        running: Mapping[str, int] | None = None,
    ) -> list[K]:
        """The next job (as `pop`) and, when it has a group, up to `size - 1` more of that group, each the next
        in fair order among the group's candidates, at most `per_user` from one user counting the `running` ones
        (USER_MAX_RUNNING: a claim past it would be refused). A batch is fair as single jobs are: alternating users,
        each one's oldest. Deferred candidates, and those whose key is not `where`, are left where they are (`now`:
        the clock their `not_before` is by)."""
        now = time.time() if now is None else now

        def ready(e: _Entry[K]) -> bool:
            return e.not_before <= now and (where is None or where(e.key))

        lead = self._take(ready, spread)
        if lead is None:
            return []
        batch = [lead]
        taken = dict(running or {})
        taken[lead.user] = taken.get(lead.user, 0) + 1
        while lead.group is not None and len(batch) < size:
            entry = self._take(
                lambda e: e.group == lead.group and ready(e) and (per_user is None or taken.get(e.user, 0) < per_user)
            )
            if entry is None:
                break
            batch.append(entry)
            taken[entry.user] = taken.get(entry.user, 0) + 1
        return [entry.key for entry in batch]

    def _take(self, eligible: Callable[[_Entry[K]], bool], spread: int = 1) -> _Entry[K] | None:
        """Take out the first eligible entry in fair order: "first" entries, then the oldest of the user served
        longest ago (ties: whose oldest is oldest)."""
        oldest: dict[str, _Entry[K]] = {}  # per user, their oldest eligible entry
        firsts: list[_Entry[K]] = []
        for user, entries in self._by_user.items():
            for entry in entries:
                if eligible(entry):
                    oldest.setdefault(user, entry)
                    if entry.first:
                        firsts.append(entry)
        if not oldest:
            return None
        if firsts:
            entry = min(firsts)
        else:
            ranked = sorted(oldest, key=lambda u: (self._served.get(u, 0), oldest[u]))
            entry = oldest[ranked[0] if spread <= 1 else random.choice(ranked[:spread])]
        self.discard(entry.key)
        self._mark_served(entry.user)
        return entry

    def _mark_served(self, user: str) -> None:
        self._served.pop(user, None)
        self._served[user] = next(self._ticks)
        while len(self._served) > self.memory:
            self._served.popitem(last=False)

    def _make_room(self, user: str, created: float, first: bool) -> bool:
        """Evict the newest entry of the user holding the most (the new one counted); False to drop the new one."""
        counts = {u: len(entries) for u, entries in self._by_user.items()}
        counts[user] = counts.get(user, 0) + 1
        biggest = max(counts, key=lambda u: counts[u])
        candidates = [e for e in self._by_user.get(biggest, []) if not e.first]  # a first never gives way
        if not candidates or (counts[biggest] == 1 and not first):
            return False  # a user's only candidate gives way to a dead worker's job alone
        if biggest == user and not first and created >= candidates[-1].created:
            return False  # the new entry is the newest that could give way: it is the one to drop
        self.discard(candidates[-1].key)
        return True
