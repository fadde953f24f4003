"""The web app's pure modules run in Node: the Delete all my jobs loop (web/src/erase.ts `eraseAll`) against
scripted replies of the deleteAllGenerations callable with a fake clock (the waits and the stops a browser test
cannot reach: a running job that never stops, Storage failing), and the line of the user's limits
(web/src/usage.ts `usageLine`) on usage docs a browser test cannot wait for (another day, limits reached, an
admin's stray values). The page's own use of them, through the emulators, is in test_web_app.py."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_schema import ESBUILD, _require_web_modules

from devtools import web_types

ERASE_RUNNER = """
import { eraseAll, erasedMessage } from "./erase.mjs";
const out = [];
for (const scenario of JSON.parse(process.argv[2])) {
  let now = 0;
  let calls = 0;
  const sleeps = [];
  const heard = [];
  const pass = async () => {
    const reply = scenario.replies[Math.min(calls, scenario.replies.length - 1)];
    calls += 1;
    now += scenario.passMs ?? 0;
    if (reply.code) throw Object.assign(new Error(reply.message ?? reply.code), { code: reply.code });
    return reply;
  };
  const sleep = async (ms) => { sleeps.push(ms); now += ms; };
  try {
    const erased = await eraseAll(pass, (sofar) => heard.push({ ...sofar }), sleep, () => now);
    out.push({ erased, message: erasedMessage(erased), sleeps, heard, calls });
  } catch (error) {
    out.push({ thrown: error.code, sleeps, calls });
  }
}
console.log(JSON.stringify(out));
"""


def deleting(deleted: int, stopping: int) -> dict:
    return {"success": True, "status": "deleting", "deleted": deleted, "stopping": stopping, "message": "Deleting"}


DONE = {"success": True, "status": "deleted", "deleted": 1, "stopping": 0, "message": "All deleted"}


USAGE_RUNNER = """
import { usageLine } from "./usage.mjs";
const [docs, now] = JSON.parse(process.argv[2]);
console.log(JSON.stringify(docs.map((doc) => usageLine(doc ?? undefined, new Date(now)))));
"""


CLOCK_RUNNER = """
import { ServerClock } from "./usage.mjs";
const out = [];
for (const { heard, now } of JSON.parse(process.argv[2])) {
  const clock = new ServerClock();
  for (const [server, local, fresh] of heard) clock.observe(Date.parse(server), Date.parse(local), fresh);
  out.push(clock.now(Date.parse(now)).toISOString());
}
console.log(JSON.stringify(out));
"""


DISMISSED_RUNNER = """
import { Dismissed, DISMISSED_MAX } from "./dismissed.mjs";
const stored = new Map();
globalThis.localStorage = {
  getItem: (key) => stored.get(key) ?? null,
  setItem: (key, value) => stored.set(key, String(value)),
  removeItem: (key) => stored.delete(key),
};
const [count] = JSON.parse(process.argv[2]);
const dismissed = new Dismissed("p", "u");
for (let i = 0; i < count; i += 1) dismissed.add(`images/job-${i}`);
dismissed.add("images/job-0");  // dismissed again: the latest
const kept = JSON.parse(stored.get("firegen.dismissed/p/u"));
const again = new Dismissed("p", "u");  // as the next page load reads it
console.log(JSON.stringify([DISMISSED_MAX, kept.length, again.has("images/job-0"), again.has("images/job-1"),
  again.has(`images/job-${count - 1}`)]));
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """web/src/<name>.ts bundled for Node, with a runner script; runs it with its argument as JSON."""
    _require_web_modules()
    folder = tmp_path_factory.mktemp("web-modules")

    def build(name: str, runner: str, label: str | None = None):
        source = web_types.REPO / "web" / "src" / f"{name}.ts"
        out = folder / f"{name}.mjs"
        subprocess.run(
            [str(ESBUILD), str(source), "--bundle", "--format=esm", f"--outfile={out}", "--log-level=warning"],
            check=True,
        )
        script = folder / f"run-{label or name}.mjs"
        script.write_text(runner)

        def run(argument) -> list:
            done = subprocess.run(
                ["node", str(script), json.dumps(argument)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        return run

    return build


@pytest.fixture(scope="module")
def erase(bundle):
    run = bundle("erase", ERASE_RUNNER)
    return lambda *scenarios: run(scenarios)


@pytest.fixture(scope="module")
def usage_line(bundle):
    return bundle("usage", USAGE_RUNNER)


def test_passes_go_on_at_once_while_jobs_are_left_and_a_moment_apart_while_running_ones_stop(erase):
    [result] = erase({"replies": [deleting(100, 0), deleting(3, 1), deleting(0, 1), DONE]})
    assert (result["calls"], result["sleeps"]) == (4, [2000, 2000])
    assert result["erased"] == {"done": True, "deleted": 104, "stopping": 0}
    assert result["message"] == "All your jobs are deleted (104 jobs deleted)"
    assert [sofar["deleted"] for sofar in result["heard"]] == [100, 103, 103, 104]  # a running total


def test_unavailable_is_tried_again_with_a_backoff_then_said(erase):
    unavailable = {"code": "functions/unavailable"}
    recovers, fails, refused = erase(
        {"replies": [unavailable, unavailable, DONE]},
        {"replies": [unavailable]},
        {"replies": [{"code": "functions/permission-denied"}]},
    )
    assert (recovers["calls"], recovers["sleeps"], recovers["erased"]["done"]) == (3, [2000, 4000], True)
    assert (fails["thrown"], fails["calls"], fails["sleeps"]) == ("functions/unavailable", 3, [2000, 4000])
    assert (refused["thrown"], refused["calls"], refused["sleeps"]) == ("functions/permission-denied", 1, [])


def test_a_pass_that_got_no_answer_is_tried_again(erase):
    """A CI run: the Functions emulator hung up on one pass ("socket hang up"; the browser saw no CORS header, the
    SDK said `internal`), and Delete all stopped there. A pass with no answer of the server's own (its message the
    bare code) is tried again as `unavailable` is; one the server answered is said at once."""
    hung_up = {"code": "functions/internal", "message": "internal"}
    recovers, said = erase(
        {"replies": [hung_up, DONE]},
        {"replies": [{"code": "functions/internal", "message": "the server's own words"}]},
    )
    assert (recovers["calls"], recovers["sleeps"], recovers["erased"]["done"]) == (2, [2000], True)
    assert (said["thrown"], said["calls"], said["sleeps"]) == ("functions/internal", 1, [])


def test_a_running_job_that_never_stops_ends_the_calls_after_five_minutes_and_says_so(erase):
    [result] = erase({"replies": [deleting(2, 1), deleting(0, 1)], "passMs": 58_000})
    assert result["erased"] == {"done": False, "deleted": 2, "stopping": 1}
    assert result["calls"] == 6  # 6 x 60 s: the first pass past 5 minutes is the last
    assert result["message"] == (
        "2 jobs deleted; 1 running job is still stopping: press Delete all my jobs again in a few minutes"
    )


LIMITS = {"max_running": 2, "max_pending": 20, "daily_budget": 600}


def usage(**fields) -> dict:
    return {"running": 1, "pending": 3, "spent_today": 12.34, "day": "2026-12-05", "limits": LIMITS, **fields}


def test_the_limits_line_says_what_is_left_and_when_a_job_would_be_refused(usage_line):
    lines = usage_line(
        [
            [
                None,
                usage(),
                usage(day="2026-12-04"),  # yesterday's spend: none today
                usage(spent_today=600),
                usage(pending=20),
                usage(running="2", pending=None, spent_today=-5),  # an admin's stray values
            ],
            "2026-12-05T10:00:00Z",
        ]
    )
    assert lines == [
        "Your limits: nothing used yet",
        "Your limits: 3 of 20 jobs queued or running (1 of 2 at once); 12.3 of 600 GPU-seconds used today",
        "Your limits: 3 of 20 jobs queued or running (1 of 2 at once); 0 of 600 GPU-seconds used today",
        "Your limits: 3 of 20 jobs queued or running (1 of 2 at once); 600 of 600 GPU-seconds used today: today's "
        "budget is spent, new jobs are refused until 00:00 UTC",
        "Your limits: 20 of 20 jobs queued or running (1 of 2 at once); 12.3 of 600 GPU-seconds used today: new jobs "
        "are refused until one of these ends",
        "Your limits: 0 of 20 jobs queued or running (0 of 2 at once); 0 of 600 GPU-seconds used today",
    ]


@pytest.fixture(scope="module")
def server_clock(bundle):
    return bundle("usage", CLOCK_RUNNER, "server-clock")


def test_the_page_tells_the_day_by_firestores_clock_from_the_usage_docs_writes(server_clock):
    """The clock review: the day whose spend the line shows was the browser's: a clock 2 minutes fast showed a
    spent budget as free from 23:58 UTC while the server refused every job until its midnight. The usage doc's
    `updated_at`, heard as it is written, sets the page's clock; an old write read at load only says the server's
    now is at least that; a write heard hours late (a reconnection) says nothing."""
    assert server_clock(
        [
            {"heard": [], "now": "2026-12-05T23:59:00Z"},  # nothing heard: the browser's own
            # 2 minutes fast: a fresh write at 23:57:00 heard at (browser) 23:59:00.
            {"heard": [["2026-12-05T23:57:00Z", "2026-12-05T23:59:00Z", True]], "now": "2026-12-06T00:00:30Z"},
            # 3 minutes slow: the first read shows a write later than the browser's now.
            {"heard": [["2026-12-06T00:01:00Z", "2026-12-05T23:58:30Z", False]], "now": "2026-12-05T23:59:00Z"},
            # An old write read at load says nothing of a browser that is right.
            {"heard": [["2026-12-05T08:00:00Z", "2026-12-05T23:59:00Z", False]], "now": "2026-12-05T23:59:30Z"},
            # A write heard 3 hours late is no measure.
            {"heard": [["2026-12-05T21:00:00Z", "2026-12-06T00:00:10Z", True]], "now": "2026-12-06T00:00:20Z"},
            # A write heard 5 minutes late (a reconnection) does not undo the measure of one heard at once.
            {
                "heard": [
                    ["2026-12-05T23:50:00Z", "2026-12-05T23:50:00Z", True],
                    ["2026-12-05T23:51:00Z", "2026-12-05T23:56:00Z", True],
                ],
                "now": "2026-12-06T00:00:05Z",
            },
        ]
    ) == [
        "2026-12-05T23:59:00.000Z",
        "2026-12-05T23:58:30.000Z",
        "2026-12-06T00:01:30.000Z",
        "2026-12-05T23:59:30.000Z",
        "2026-12-06T00:00:20.000Z",
        "2026-12-06T00:00:05.000Z",
    ]


def test_dismissed_jobs_are_kept_up_to_a_bound_the_longest_dismissed_going_first(bundle):
    """A soak audit: a user with more jobs of a type than the page lists (Show older shown) never had a deleted job's
    key forgotten (that needs the whole history listed), so the keys in localStorage grew with every dismissal."""
    run = bundle("dismissed", DISMISSED_RUNNER)
    bound = run([0])[0]
    assert run([bound + 50]) == [bound, bound, True, False, True]
    assert run([10])[1:] == [10, True, True, True]  # under the bound, all kept
