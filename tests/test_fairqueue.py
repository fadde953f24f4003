"""listener/fairqueue.py against its docstring, on sequences of operations Hypothesis draws: candidates offered
(again, first, grouped, deferred, at any age, ties included), discarded, handed out alone or in batches, the
queue full. A model written from the docstring says what each step must give: the fair order (firsts, then the
user served longest ago, ties to whose oldest is oldest, that user's oldest), batches of one group within
`per_user` (counting each user's `running`), deferred candidates held, the bound kept by the biggest user's newest. Pure: no Firestore.

`FAIRQUEUE_EXAMPLES` sets how many sequences (default 300, about 4 s); a hunt runs thousands."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from listener.fairqueue import FairQueue

KEYS = [f"k{n}" for n in range(14)]
USERS = ["ann", "bob", "cy", "dee", "ann", "bob", "eve", "fay", "gus"]  # more than CAPACITY: each may hold one
GROUPS = [None, "g1", "g1", "g2"]
CAPACITY = 6
# `where`: candidates it does not take (a model still loading) are passed over, their place kept.
WHERE = {None: None, "odd keys held": lambda key: int(key[1:]) % 2 == 0}


@dataclass
class Held:
    """A candidate as the docstring speaks of it: its age (created, then the order it came in), its user, and
    what may change while it is held."""

    created: float
    order: int
    user: str
    first: bool
    group: str | None
    not_before: float

    @property
    def age(self) -> tuple[float, int]:
        return (self.created, self.order)


class FairQueueModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.queue: FairQueue[str] = FairQueue(capacity=CAPACITY)
        self.held: dict[str, Held] = {}
        self.served: dict[str, int] = {}  # user -> when last handed a job (never: absent)
        self.clock = 0  # hands-out so far: the served order
        self.order = 0

    # --- the docstring's fair order -----------------------------------------------------------------------
    def next_in_fair_order(self, eligible) -> str | None:
        """Firsts before everything (oldest first); else the user served longest ago (a user never served before
        any; ties: whose oldest is oldest), and that user's oldest."""
        ready = {key: held for key, held in self.held.items() if eligible(held)}
        if not ready:
            return None
        firsts = [key for key, held in ready.items() if held.first]
        if firsts:
            return min(firsts, key=lambda key: ready[key].age)
        oldest: dict[str, str] = {}
        for key, held in sorted(ready.items(), key=lambda item: item[1].age):
            oldest.setdefault(held.user, key)
        user = min(oldest, key=lambda u: (self.served.get(u, 0), ready[oldest[u]].age))
        return oldest[user]

    def hand_out(self, key: str) -> None:
        self.clock += 1
        self.served[self.held.pop(key).user] = self.clock

    # --- rules ----------------------------------------------------------------------------------------------
    @rule(
        key=st.sampled_from(KEYS),
        user=st.sampled_from(USERS),
        created=st.integers(0, 6),
        first=st.booleans(),
        group=st.sampled_from(GROUPS),
        not_before=st.sampled_from([0.0, 0.0, 5.0, 10.0]),
    )
    def add(self, key, user, created, first, group, not_before):
        was_held = dict(self.held)
        answer = self.queue.add(key, user, float(created), first=first, group=group, not_before=not_before)
        if key in was_held:  # keeps its place: only first, its group and readiness may change
            assert answer is True
            held = self.held[key]
            held.first |= first
            held.group = held.group if group is None else group
            held.not_before = min(held.not_before, not_before)
            return
        self.order += 1
        new = Held(float(created), self.order, user, first, group, not_before)
        if len(was_held) < CAPACITY:
            assert answer is True
            self.held[key] = new
            return
        self.make_room(key, new, answer)

    def make_room(self, key: str, new: Held, answer: bool) -> None:
        """Full: the newest entry of the user holding the most (the new one counted) makes room, never a first;
        the new entry is dropped when it would be that entry itself (or the user has none to give), or when every
        user holds one and it is no first (a user's only entry gives way to a first alone)."""
        counts: dict[str, int] = {}
        for held in [*self.held.values(), new]:
            counts[held.user] = counts.get(held.user, 0) + 1
        biggest = [u for u, n in counts.items() if n == max(counts.values())]  # ties: the docstring says not which

        def victim(user: str) -> str | None:
            if counts[user] == 1 and not new.first:
                return None
            givers = {k: h for k, h in self.held.items() if h.user == user and not h.first}
            if user == new.user and not new.first:
                givers[key] = new
            return max(givers, key=lambda k: givers[k].age) if givers else None

        outcomes = {victim(user) for user in biggest}
        gone = set(self.held) - {k for k in self.held if k in self.queue}
        if answer:
            assert key in self.queue and len(gone) == 1 and gone <= outcomes, (gone, outcomes)
            del self.held[gone.pop()]
            self.held[key] = new
        else:
            assert key not in self.queue and not gone
            assert key in outcomes or None in outcomes, outcomes

    @rule(key=st.sampled_from(KEYS))
    def discard(self, key):
        self.queue.discard(key)
        self.held.pop(key, None)

    @rule(
        size=st.integers(1, 4),
        per_user=st.sampled_from([None, 1, 1, 2]),
        now=st.sampled_from([0.0, 5.0, 20.0]),
        where=st.sampled_from(list(WHERE)),
        running=st.dictionaries(st.sampled_from(USERS), st.integers(0, 2), max_size=3),
    )
    def pop_batch(self, size, per_user, now, where, running):
        takes = WHERE[where] or (lambda key: True)
        batch = self.queue.pop_batch(size, per_user=per_user, now=now, where=WHERE[where], running=running)
        keys = {id(held): key for key, held in self.held.items()}

        def ready(held: Held) -> bool:
            return held.not_before <= now and takes(keys[id(held)])

        lead = self.next_in_fair_order(ready)
        if lead is None:
            assert batch == []
            return
        group, user = self.held[lead].group, self.held[lead].user
        expected = [lead]
        self.hand_out(lead)
        taken = {**running, user: running.get(user, 0) + 1}  # the lead's user: the caller's `where` saw to it
        while group is not None and len(expected) < size:
            more = self.next_in_fair_order(
                lambda held: (
                    held.group == group and ready(held) and (per_user is None or taken.get(held.user, 0) < per_user)
                )
            )
            if more is None:
                break
            expected.append(more)
            user = self.held[more].user
            self.hand_out(more)
            taken[user] = taken.get(user, 0) + 1
        assert batch == expected

    @rule()
    def pop(self):
        key = self.queue.pop()  # now: the clock's, past every deferral drawn here
        assert key == self.next_in_fair_order(lambda held: True)
        if key is not None:
            self.hand_out(key)

    # --- what holds after every step ------------------------------------------------------------------------
    @invariant()
    def holds_what_the_model_holds(self):
        assert len(self.queue) == len(self.held) <= CAPACITY
        assert all(key in self.queue for key in self.held)
        assert self.queue.users() == len({held.user for held in self.held.values()})
        for user in USERS:
            ages = [held.created for held in self.held.values() if held.user == user]
            assert self.queue.oldest(user) == (min(ages) if ages else None)
        assert self.queue.ready_at() == min((held.not_before for held in self.held.values()), default=None)
        takes = WHERE["odd keys held"]
        taken = [held.not_before for key, held in self.held.items() if takes(key)]
        assert self.queue.ready_at(takes) == min(taken, default=None)


def test_the_fair_queue_keeps_its_docstrings_word():
    run_state_machine_as_test(
        FairQueueModel,
        settings=settings(
            max_examples=int(os.environ.get("FAIRQUEUE_EXAMPLES", "300")),
            stateful_step_count=40,
            deadline=None,
            database=None,
        ),
    )


def test_a_created_at_in_milliseconds_is_read_as_such():
    """A review: an Admin SDK's `created_at: Date.now()` (or `currentTimeMillis()`) was read as seconds, 50,000
    years ahead: the job went after every other queued job."""
    from listener.fairqueue import timestamp

    assert timestamp(1_700_000_000_000, 0.0) == 1_700_000_000.0 and timestamp(1_700_000_000.5, 0.0) == 1_700_000_000.5
    queue: FairQueue[str] = FairQueue()
    queue.add("written-in-ms-an-hour-ago", "ann", timestamp(1_700_000_000_000 - 3_600_000, 0.0))
    queue.add("now", "ann", timestamp(1_700_000_000, 0.0))
    assert queue.pop() == "written-in-ms-an-hour-ago"
