"""`make bench`: the figures we promise, measured on this machine, printed as a table and saved as JSON.

Sections (each can be run alone with --only NAME):
- pipelines: the tiny SDXL (512x512, 20 steps) and Wan (16 frames, 512x512, 20 steps) pipelines on this CPU;
- lifecycle: pickup latency, per-job overhead and throughput with 1, 2 and 4 no-op workers on the emulators;
- scheduling: user B's wait (jobs run before it, seconds) when B queues 1 job behind user A's 50, one worker;
  the latency of cancelling a running job (owner's `cancel_requested` write → doc failed `Cancelled`);
- worker: cold start of `python -m listener` (tiny models) and runsync accept latency on the SDK's local API,
  sequential and with 8 concurrent clients, with the handler's own share; the emulator's `create` latency alone
  and while a listener is open (what bounds the accept latency on the emulator).
- batching: jobs per second of the real worker (tiny SDXL on this CPU) draining 16 queued 256x256 jobs, with
  BATCH_MAX 1 and 4 (the listener's claim-a-batch path end to end; the GPU figure is bench/gpu.py's).
- latency: the real worker (tiny SDXL on this CPU) draining 20 queued 256x256 jobs with Firestore and Storage
  behind a proxy that delays every byte 0, 25 and 60 ms each way (bench/latency_proxy.py): what a worker far from
  its database's region loses per job to round trips;
- soak: the real worker (tiny models) through rounds of mixed jobs (images and videos, by runsync and by
  client doc, some cancelled), its resident memory, threads and open files measured idle after each round:
  what a long-lived RunPod worker would leak (`--soak-rounds`, `--soak-jobs`).
A GPU section runs only where CUDA is present (see bench/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtools import emulators as emu
from devtools.client import post_runsync
from devtools.worker import WorkerProcess
from firegen_core.quota import MAX_COUNT_LIMIT, MAX_DAILY_BUDGET

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "out" / "bench" / "report.json"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- pipelines ------------------------------------------------------------------------------------------------


def bench_pipelines(cache: Path) -> dict:
    from firegen_core.contract import parse_runsync_input
    from generation.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(image_model="tiny", video_model="tiny", cache_dir=str(cache)))
    base = {"prompt": "A sunset over mountains", "use_cloud_storage": False, "num_inference_steps": 20, "seed": 1}
    cases = {
        "sdxl_512_20steps_s": parse_runsync_input({**base, "width": 512, "height": 512}),
        "wan_16frames_512_20steps_s": parse_runsync_input({**base, "num_frames": 16, "fps": 8}),
    }
    figures = {}
    for name, request in cases.items():
        engine.generate(request)  # load + warm up
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.generate(request)
            runs.append(time.perf_counter() - t0)
        figures[name] = round(statistics.median(runs), 3)
    return figures


# --- lifecycle with no-op workers -----------------------------------------------------------------------------


# The benchmarks load the queue with one user's jobs: they measure the queue, not the per-user limits, so the
# workers run with those lifted.
UNLIMITED = {
    "USER_MAX_RUNNING": str(MAX_COUNT_LIMIT),
    "USER_MAX_PENDING": str(MAX_COUNT_LIMIT),
    "USER_DAILY_BUDGET": str(MAX_DAILY_BUDGET),
}


class NoopWorkers:
    def __init__(self, env: dict, logs: Path, count: int, seconds: float = 0.0, steps: int = 4):
        self.procs = []
        for i in range(count):
            log = open(logs / f"noop-{uuid.uuid4().hex[:6]}.log", "wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.noop"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **env,
                    **UNLIMITED,
                    "NOOP_SECONDS": str(seconds),
                    "NOOP_STEPS": str(steps),
                    "SWEEP_INTERVAL_SECONDS": "5",
                    "LOG_LEVEL": "WARNING",
                },
                start_new_session=True,
            )
            self.procs.append((proc, log))
        for proc, log in self.procs:
            assert emu.wait_until(lambda: "worker_ready" in Path(log.name).read_text(errors="ignore"), 60), log.name

    def stop(self):
        for proc, log in self.procs:
            proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def write_jobs(db, count: int, prefix: str, user: str = "bench-user") -> list:
    from google.cloud import firestore

    refs = []
    batch = db.batch()
    for i in range(count):
        ref = db.document(f"generations/{user}/images/{prefix}-{i:04d}")
        batch.set(
            ref,
            {
                "status": "queued",
                "prompt": "bench",
                "generated": False,
                "error": False,
                "created_at": firestore.SERVER_TIMESTAMP,
                "width": 256,
                "height": 256,
            },
        )
        refs.append(ref)
    batch.commit()
    return refs


def wait_done(db, refs: list, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    pending = {ref.path: ref for ref in refs}
    docs = {}
    while pending and time.monotonic() < deadline:
        for snapshot in db.get_all(list(pending.values())):
            data = snapshot.to_dict() or {}
            if data.get("status") in ("completed", "failed"):
                docs[snapshot.reference.path] = data
                pending.pop(snapshot.reference.path)
        time.sleep(0.05)
    if pending:
        raise RuntimeError(f"{len(pending)} jobs not finished within {timeout} s")
    return [docs[ref.path] for ref in refs]


def bench_lifecycle(firestore_emulator, storage_emulator, logs: Path) -> dict:
    figures = {}
    project = emu.unique_id("demo-bench")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("bench"))
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name)
    db = firestore_emulator.client(project)

    workers = NoopWorkers(env, logs, 1)
    try:
        pickups, overheads = [], []
        for i in range(30):
            (doc,) = wait_done(db, write_jobs(db, 1, f"pickup-{i}"))
            pickups.append((doc["started_at"] - doc["created_at"]).total_seconds())
            overheads.append((doc["completed_at"] - doc["created_at"]).total_seconds() - doc["generation_seconds"])
        figures.update(
            pickup_p50_ms=ms(pct(pickups, 50)),
            pickup_p99_ms=ms(pct(pickups, 99)),
            overhead_p50_ms=ms(pct(overheads, 50)),
            overhead_p99_ms=ms(pct(overheads, 99)),
        )
    finally:
        workers.stop()

    # With no generation at all, every cost is CPU on this machine (workers, emulators), so 4 workers on 2 cores
    # cannot beat 1 by much; with simulated GPU time (a sleep, as a GPU leaves the CPU free) the lifecycle's
    # own scaling shows.
    for gpu_seconds, label in ((0.0, "noop"), (0.5, "gpu0.5s")):
        for count in (1, 2, 4):
            workers = NoopWorkers(env, logs, count, gpu_seconds)
            try:
                jobs = 40
                docs = wait_done(db, write_jobs(db, jobs, f"tp{label}{count}-{uuid.uuid4().hex[:4]}"))
                first = min(d["created_at"] for d in docs)
                last = max(d["completed_at"] for d in docs)
                figures[f"throughput_{label}_{count}w_jobs_per_s"] = round(jobs / (last - first).total_seconds(), 2)
                failed = sum(d["status"] != "completed" for d in docs)
                if failed:
                    figures[f"throughput_{label}_{count}w_failed"] = failed
            finally:
                workers.stop()
        one = figures[f"throughput_{label}_1w_jobs_per_s"]
        figures[f"speedup_{label}_4w_vs_1w"] = round(figures[f"throughput_{label}_4w_jobs_per_s"] / one, 2)
    return figures


# --- scheduling: fairness and cancellation (issue #11) -------------------------------------------------------


def bench_scheduling(firestore_emulator, storage_emulator, logs: Path) -> dict:
    """B's wait behind A's backlog (one worker, 0.2 s per job), and how fast a running job stops when its owner
    sets cancel_requested (a job of 0.05 s steps, as a GPU's denoising steps)."""
    project = emu.unique_id("demo-sched")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("sched"))
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name)
    db = firestore_emulator.client(project)
    figures = {}

    workers = NoopWorkers(env, logs, 1, seconds=0.2)
    try:
        a_refs = write_jobs(db, 50, "a", user="user-a")
        assert emu.wait_until(lambda: any((r.get().to_dict() or {}).get("started_at") for r in a_refs[:5]), 30)
        (b_ref,) = write_jobs(db, 1, "b", user="user-b")
        (b,) = wait_done(db, [b_ref], timeout=60)
        docs = wait_done(db, a_refs, timeout=120)
        ahead = sum(b["created_at"] < d["started_at"] < b["started_at"] for d in docs)
        figures["fair_b_wait_jobs"] = ahead
        figures["fair_b_wait_s"] = round((b["started_at"] - b["created_at"]).total_seconds(), 2)
    finally:
        workers.stop()

    workers = NoopWorkers(env, logs, 1, seconds=60, steps=1200)
    try:
        latencies = []
        for i in range(5):
            (ref,) = write_jobs(db, 1, f"cancel-{i}")
            assert emu.wait_until(lambda: (ref.get().to_dict() or {}).get("status") == "processing", 30)
            asked = ref.update({"cancel_requested": True}).update_time  # server time of the request
            (doc,) = wait_done(db, [ref], timeout=30)
            assert doc["error_type"] == "Cancelled", doc
            latencies.append((doc["failed_at"] - asked).total_seconds())
        figures["cancel_running_p50_ms"] = ms(pct(latencies, 50))
        figures["cancel_running_max_ms"] = ms(max(latencies))
    finally:
        workers.stop()
    return figures


# --- the real worker process ----------------------------------------------------------------------------------


def start_worker(firestore_emulator, storage_emulator, logs: Path, cache: Path, **settings) -> WorkerProcess:
    project = emu.unique_id("demo-bench")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("bench"))
    env = {**emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name), "FIREGEN_CACHE": str(cache)}
    return WorkerProcess(logs, env, **{**UNLIMITED, **settings}).start()


def accept_latency(worker: WorkerProcess, label: str, users: int = 8) -> dict:
    """The concurrent clients are `users` users (8: each client its own, as in production, where one user's
    requests rarely overlap; 1: one user's burst, whose admissions all contend for that user's usage doc)."""
    body = {
        "prompt": "bench",
        "use_cloud_storage": True,
        "width": 256,
        "height": 256,
        "num_inference_steps": 10,
    }

    def accept(i: int | None) -> float:
        t = time.perf_counter()
        user = f"bench-user-{(i or 0) % users}"
        answer = post_runsync(worker.runsync_url, {**body, "user_id": user, "file_uid": uuid.uuid4().hex[:12]})
        assert (answer.get("output") or {}).get("status") == "accepted", answer
        return time.perf_counter() - t

    for _ in range(50):
        accept(None)  # warm-up: the emulator's JVM is slow until its code paths are compiled
    logged = len(worker.events("request_accepted"))
    sequential = [accept(None) for _ in range(100)]
    # The handler's own time (its log's `ms`): the Firestore create, nearly all of it; the rest is HTTP and the SDK.
    handler = [json.loads(line)["ms"] / 1000 for line in worker.events("request_accepted")[logged:]]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(accept, range(200)))
    return {
        f"accept_seq_p50_ms{label}": ms(pct(sequential, 50)),
        f"accept_seq_p99_ms{label}": ms(pct(sequential, 99)),
        f"accept_seq_handler_p50_ms{label}": ms(pct(handler, 50)),
        f"accept_seq_handler_p99_ms{label}": ms(pct(handler, 99)),
        f"accept_8conc_p50_ms{label}": ms(pct(concurrent, 50)),
        f"accept_8conc_p99_ms{label}": ms(pct(concurrent, 99)),
    }


# A process that only listens, as a worker's reconciler does, so its CPU is not the measuring process's.
_LISTENER = """
import sys, time
from google.cloud import firestore
from firegen_core.jobs import JobStore
watch = JobStore(firestore.Client(project=sys.argv[1])).queued("images").on_snapshot(lambda *_: None)
print("listening", flush=True)
time.sleep(600)
"""


def emulator_create_latency(firestore_emulator) -> dict:
    """One Firestore `create` of a queued doc (the accept path's only round trip) on the emulator, alone and
    while another process listens to queued docs, as a worker does: the emulator answers a write only after
    matching it against every open listener, at a cost that grows with the docs the listener holds (here up to
    450 queued docs, as when a busy worker's backlog grows)."""
    from google.cloud.firestore import SERVER_TIMESTAMP

    project = emu.unique_id("demo-create")
    client = firestore_emulator.client(project)

    def creates() -> list[float]:
        times = []
        for i in range(250):
            t = time.perf_counter()
            client.document(f"generations/bench/images/{uuid.uuid4().hex}").create(
                {"status": "queued", "prompt": "bench", "modified": SERVER_TIMESTAMP}
            )
            times.append(time.perf_counter() - t)
        return times[50:]  # warm-up

    alone = creates()
    listener = subprocess.Popen(
        [sys.executable, "-c", _LISTENER, project],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,  # firegen_core is importable from there
        env={**os.environ, "FIRESTORE_EMULATOR_HOST": firestore_emulator.host_port},
    )
    try:
        listener.stdout.readline()
        listened = creates()
    finally:
        listener.kill()
        listener.wait()
    return {
        "emulator_create_p50_ms": ms(pct(alone, 50)),
        "emulator_create_p99_ms": ms(pct(alone, 99)),
        "emulator_create_listened_p50_ms": ms(pct(listened, 50)),
        "emulator_create_listened_p99_ms": ms(pct(listened, 99)),
    }


def bench_worker(firestore_emulator, storage_emulator, logs: Path, cache: Path) -> dict:
    t0 = time.perf_counter()
    worker = start_worker(firestore_emulator, storage_emulator, logs, cache)
    cold = time.perf_counter() - t0
    try:
        ready = json.loads(worker.events("worker_ready")[-1])
        # Nothing queued: the image model before ready; the video model after, in the background (`models_loaded`).
        assert emu.wait_until(lambda: worker.events("models_loaded"), 120), worker.log_tail()
        figures = {
            "cold_start_s": round(cold, 2),
            "cold_import_s": ready["import_seconds"],
            "cold_model_load_s": ready["load_seconds"],
            "cold_later_model_load_s": json.loads(worker.events("models_loaded")[-1])["load_seconds"],
        }
        # Every accepted job is then generated by the tiny model on these same 2 cores, competing with the
        # requests; on RunPod that work is the GPU's.
        figures.update(accept_latency(worker, "_cpu_generating"))
    finally:
        worker.stop()
    # As on a GPU worker: the slot is busy (a sleep stands for the GPU's time) and the CPU is free. The figure
    # the targets judge.
    worker = start_worker(firestore_emulator, storage_emulator, logs, cache, module="bench.busy_worker")
    try:
        figures.update(accept_latency(worker, ""))
        figures.update(accept_latency(worker, "_one_user", users=1))
    finally:
        worker.stop()
    # No model (IMAGE_MODEL=none): every accepted job is claimed and failed at once, so each request brings two
    # more writes and their listener events into the same process and emulator: the busiest request path.
    worker = start_worker(firestore_emulator, storage_emulator, logs, cache, IMAGE_MODEL="none")
    try:
        figures.update(accept_latency(worker, "_no_model"))
    finally:
        worker.stop()
    figures.update(emulator_create_latency(firestore_emulator))
    return figures


def bench_batching(firestore_emulator, storage_emulator, logs: Path, cache: Path, jobs: int = 16) -> dict:
    figures = {}
    for batch_max in (1, 4):
        worker = start_worker(firestore_emulator, storage_emulator, logs, cache, BATCH_MAX=str(batch_max))
        try:
            db = firestore_emulator.client(worker.env["GOOGLE_CLOUD_PROJECT"])
            docs = wait_done(db, write_jobs(db, jobs, f"batch{batch_max}-{uuid.uuid4().hex[:4]}"), timeout=600)
            first = min(d["created_at"] for d in docs)
            last = max(d["completed_at"] for d in docs)
            figures[f"batch{batch_max}_jobs_per_s"] = round(jobs / (last - first).total_seconds(), 2)
            sizes = [json.loads(line).get("batch_size", 1) for line in worker.events("job_started")]
            figures[f"batch{batch_max}_largest_batch"] = max(sizes)
            failed = sum(d["status"] != "completed" for d in docs)
            if failed:
                figures[f"batch{batch_max}_failed"] = failed
        finally:
            worker.stop()
    figures["batch4_vs_batch1"] = round(figures["batch4_jobs_per_s"] / figures["batch1_jobs_per_s"], 2)
    return figures


def bench_latency(firestore_emulator, storage_emulator, logs: Path, cache: Path, jobs: int = 20) -> dict:
    """Jobs a minute, and the worker's time a job outside its generation (wall time over the jobs, less their
    generation), with every Firestore and Storage byte the worker sends or receives delayed each way."""
    from bench.latency_proxy import DelayProxy

    figures = {}
    for delay_ms in (0, 25, 60):
        firestore_target = (firestore_emulator.host, firestore_emulator.port)
        storage_target = (storage_emulator.host, storage_emulator.port)
        with (
            DelayProxy(firestore_target, delay_ms / 1000) as firestore_proxy,
            DelayProxy(storage_target, delay_ms / 1000) as storage_proxy,
        ):
            delayed = {
                "FIRESTORE_EMULATOR_HOST": firestore_proxy.host_port,
                "STORAGE_EMULATOR_HOST": f"http://{storage_proxy.host_port}",
            }
            worker = start_worker(firestore_emulator, storage_emulator, logs, cache, serve_api=False, **delayed)
            try:
                db = firestore_emulator.client(worker.env["GOOGLE_CLOUD_PROJECT"])
                docs = wait_done(db, write_jobs(db, jobs, f"latency{delay_ms}-{uuid.uuid4().hex[:4]}"), timeout=600)
            finally:
                worker.stop()
        wall = (max(d["completed_at"] for d in docs) - min(d["created_at"] for d in docs)).total_seconds()
        generating = sum(d.get("generation_seconds", 0.0) for d in docs)
        figures[f"latency_{delay_ms}ms_jobs_per_min"] = round(jobs / wall * 60, 1)
        figures[f"latency_{delay_ms}ms_outside_generation_per_job_ms"] = ms((wall - generating) / jobs)
        failed = sum(d["status"] != "completed" for d in docs)
        if failed:
            figures[f"latency_{delay_ms}ms_failed"] = failed
    return figures


# --- soak: what a long-lived worker keeps -----------------------------------------------------------------------


def process_figures(pid: int) -> tuple[float, int, int]:
    """Resident memory (MiB), threads and open file descriptors of a process (Linux's /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(rss_kib / 1024, 1), len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def soak_round(worker: WorkerProcess, db, round_no: int, jobs: int) -> list:
    """One round's jobs, as the product's clients send them: a video in ten, half by runsync and half by a
    client's queued doc, one in seven cancelled by its owner as it waits or runs."""
    from google.cloud import firestore

    refs = []
    for i in range(jobs):
        user, file_uid = f"soak-user-{i % 4}", f"soak{round_no}-{i}-{uuid.uuid4().hex[:4]}"
        if i % 10 == 9:
            media, params = "videos", {"num_frames": 16, "video_width": 256, "video_height": 256}
        else:
            media, params = "images", {"width": 256, "height": 256}
        params = {"prompt": f"soak {i}", "num_inference_steps": 10, **params}
        ref = db.document(f"generations/{user}/{media}/{file_uid}")
        if i % 2:
            body = {**params, "user_id": user, "file_uid": file_uid, "use_cloud_storage": True}
            answer = post_runsync(worker.runsync_url, body)
            assert (answer.get("output") or {}).get("status") == "accepted", answer
        else:
            queued = {"status": "queued", "generated": False, "error": False, "created_at": firestore.SERVER_TIMESTAMP}
            ref.set({**queued, **params})
        if i % 7 == 3:
            ref.update({"cancel_requested": True})
        refs.append(ref)
    return refs


def bench_soak(firestore_emulator, storage_emulator, logs: Path, cache: Path, rounds: int, jobs: int) -> dict:
    """The worker's figures after each round, once every job of it has ended (the worker idle). The first round
    is the warm-up (the pipelines' first calls, the clients' pools): growth is measured from its end. Resident
    memory moves by ~200 MiB from round to round as the allocator keeps or returns freed blocks, so a leak shows
    as a rising floor: the lowest of the later half of the rounds against the lowest of the earlier half."""
    worker = start_worker(firestore_emulator, storage_emulator, logs, cache)
    outcomes: dict[str, int] = {}
    samples = []
    started = time.perf_counter()
    try:
        db = firestore_emulator.client(worker.env["GOOGLE_CLOUD_PROJECT"])
        for round_no in range(rounds):
            for doc in wait_done(db, soak_round(worker, db, round_no, jobs), timeout=600):
                outcome = doc.get("error_type") or doc["status"]
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            samples.append(process_figures(worker.pid))
        seconds = time.perf_counter() - started
    finally:
        worker.stop()
    warm = samples[1:] or samples
    earlier, later = warm[: len(warm) // 2] or warm, warm[len(warm) // 2 :]
    return {
        "soak_jobs": rounds * jobs,
        "soak_jobs_per_s": round(rounds * jobs / seconds, 2),
        "soak_outcomes": ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items())),
        "soak_rss_mib_after_warmup": samples[0][0],
        "soak_rss_mib_max": max(rss for rss, _, _ in samples),
        "soak_rss_floor_growth_mib": round(min(s[0] for s in later) - min(s[0] for s in earlier), 1),
        "soak_threads_growth": warm[-1][1] - samples[0][1],
        "soak_fds_growth": warm[-1][2] - samples[0][2],
    }


TARGETS = {
    "accept_seq_p99_ms": ("<", 50),
    "accept_8conc_p99_ms": ("<", 200),
    "pickup_p50_ms": ("<", 200),
    "pickup_p99_ms": ("<", 1000),
    "overhead_p50_ms": ("<", 300),
    "cold_start_s": ("<", 15),
    "speedup_noop_4w_vs_1w": (">=", 3),
    "speedup_gpu0.5s_4w_vs_1w": (">=", 3),
    "fair_b_wait_jobs": ("<", 2),
    "cancel_running_max_ms": ("<", 2000),
    "soak_rss_floor_growth_mib": ("<", 100),
    "soak_threads_growth": ("<", 1),
    "soak_fds_growth": ("<", 1),
}


def verdict(name: str, value) -> str:
    if name not in TARGETS:
        return ""
    op, limit = TARGETS[name]
    ok = value < limit if op == "<" else value >= limit
    return f"{'ok ' if ok else 'MISS'} (target {op} {limit})"


SECTIONS = [
    "pipelines",
    "lifecycle",
    "scheduling",
    "worker",
    "batching",
    "latency",
    "soak",
]  # all but the first on emulators


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*SECTIONS, "gpu"], action="append")
    parser.add_argument("--soak-rounds", type=int, default=12, help="soak: rounds of jobs (the first is the warm-up)")
    parser.add_argument("--soak-jobs", type=int, default=20, help="soak: jobs a round")
    args = parser.parse_args(argv)
    sections = args.only or [*SECTIONS, "gpu"]
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="firegen-bench-") as tmp:
        tmp = Path(tmp)
        cache = Path(os.environ.get("FIREGEN_CACHE") or tmp / "tiny")
        if "pipelines" in sections:
            report["sections"]["pipelines"] = bench_pipelines(cache)
        if "gpu" in sections:
            from bench.gpu import bench_gpu

            report["sections"]["gpu"] = bench_gpu()
        if set(SECTIONS[1:]) & set(sections):
            with (
                emu.FirestoreEmulator(tmp / "logs") as firestore,
                emu.StorageEmulator(tmp / "logs", in_memory=True) as storage,
            ):
                if "lifecycle" in sections:
                    report["sections"]["lifecycle"] = bench_lifecycle(firestore, storage, tmp / "logs")
                if "scheduling" in sections:
                    report["sections"]["scheduling"] = bench_scheduling(firestore, storage, tmp / "logs")
                if "worker" in sections:
                    report["sections"]["worker"] = bench_worker(firestore, storage, tmp / "logs", cache)
                if "batching" in sections:
                    report["sections"]["batching"] = bench_batching(firestore, storage, tmp / "logs", cache)
                if "latency" in sections:
                    report["sections"]["latency"] = bench_latency(firestore, storage, tmp / "logs", cache)
                if "soak" in sections:
                    report["sections"]["soak"] = bench_soak(
                        firestore, storage, tmp / "logs", cache, args.soak_rounds, args.soak_jobs
                    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print(f"\n{'figure':<40} {'value':>12}  check")
    for section, figures in report["sections"].items():
        print(f"-- {section}")
        for name, value in figures.items():
            print(f"{name:<40} {value!s:>12}  {verdict(name, value)}")
    print(f"\nreport: {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
