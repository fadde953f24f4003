"""When this worker may take over a job whose lease ran out: not within a lease period of Firestore's return.

After Firestore was away from this worker, every lease counts as renewed when it came back: the owners were cut
off as this worker was. So a transient failure of a heartbeat or a sweep, or one held up past SLOW_CALL_SECONDS (a
call that hung until Firestore came back), stops takeovers of expired leases until one lease period after the first
heartbeat or sweep that answered again (the chaos audit: a 2-minute outage ended as an owner's generation did, and
another worker's sweep took the job over seconds before the owner's fence check came through, throwing the
generation away; counted from the last failure instead, a short lease had run out before Firestore came back, and
the re-check saw the same). Every door that offers a claim asks (`allowed`): the sweep, a runsync, a key offered
again after a failed claim (the fencing review: the deferral held in the sweep alone).
"""

from __future__ import annotations

import time

from .runner import transient

# A heartbeat or a sweep's query that took longer (its retries included) was held up by Firestore (SIGSTOP-like: a
# call hangs, then answers when it is back). Past a loaded emulator's slowest seen answers.
SLOW_CALL_SECONDS = 5.0


class Takeovers:
    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds
        self._troubled = False  # Firestore failed (or held a call up) since it last answered
        self._from = 0.0  # by the monotonic clock: no takeover before

    def failed(self, exc: BaseException) -> None:
        """A call to Firestore failed."""
        if transient(exc):  # not a bug here, which must not stop takeovers for good
            self._troubled = True

    def held_up(self, took: float) -> bool:
        """Whether a call that answered after `took` seconds was held up by an outage: then none until it answers
        again."""
        if took <= SLOW_CALL_SECONDS:
            return False
        self._troubled = True
        return True

    def answered(self, took: float) -> None:
        """A heartbeat or a whole sweep answered, its slowest call after `took` seconds."""
        if self._troubled or took > SLOW_CALL_SECONDS:
            # The deferral before the all-clear: the claim loop reads them on another thread, and in between the
            # old (past) deferral let a claim take over (the thread-safety review).
            self._from = time.monotonic() + self.lease_seconds
            self._troubled = False

    @property
    def troubled(self) -> bool:
        """Firestore failed (or held a call up) since it last answered."""
        return self._troubled

    def allowed(self) -> bool:
        return not self._troubled and time.monotonic() >= self._from

    def seconds_left(self) -> float:
        """How long the deferral has to run."""
        return max(0.0, self._from - time.monotonic())
