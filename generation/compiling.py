"""Compiling a pipeline's denoiser (SDXL's UNet, Wan's transformer) off the request path, with a portable cache.

A worker must be ready in seconds, and `torch.compile` of SDXL's UNet takes ~106 s cold on an H100. So the
capability loads and serves eagerly at once; a `BackgroundCompile` thread compiles the denoiser by running one
warm-up step on a second pipeline object that shares the same modules (own scheduler, own per-call state: it
never touches the pipeline jobs run on), then swaps the compiled module in between two jobs. Whatever goes
wrong while compiling is logged and leaves the eager module in place.

`CompileCache`: torch's portable "mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`,
inductor's compiled kernels and AOTAutograd graphs in one blob). Loaded before compiling, so a warm cache turns
the compile into cache hits; written after the warm-up. One file per torch version and device name (artifacts
are specific to both; a file from another torch or card is simply never read). Put it on the network volume
(`FIREGEN_COMPILE_CACHE`) so every worker of an endpoint shares it.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

NETWORK_VOLUME = "/runpod-volume"
# dynamo's limit on the graphs of one function (8 by default), past which a fullgraph compile fails the call. A
# worker's denoiser legitimately has several (the warm-up's shapes, sizes that take another branch), and every
# compile in the process counts towards it (each test's pipeline, in the test suite).
RECOMPILE_LIMIT = 64
# One compile at a time per process: dynamo's tracing state is global, and two compiles would only share the CPU.
_COMPILE_LOCK = threading.Lock()


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """The network volume when there is one (shared by every worker), else beside the Hugging Face cache."""
    env = os.environ if environ is None else environ
    if Path(NETWORK_VOLUME).is_dir():
        return f"{NETWORK_VOLUME}/firegen-compile"
    hf_home = env.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())
    return f"{hf_home}/firegen-compile"


class CompileCache:
    """torch's portable compile artifacts in one file under `folder`."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        import torch

        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
        tag = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"torch-{torch.__version__}-{name}")
        self.path = Path(folder).expanduser() / f"{tag}.bin"

    def load(self) -> bool:
        """Hot-load the artifacts, if the file is there. False (and a log line) when absent or unreadable."""
        import torch

        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            log.info("no compile cache at %s: compiling from scratch", self.path)
            return False
        except OSError as exc:
            log.warning("compile cache %s unreadable: %s", self.path, exc)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # a truncated or foreign file: compile from scratch, overwrite it afterwards
            log.warning("compile cache %s not loaded (%s): compiling from scratch", self.path, exc)
            return False
        if info is None:  # torch logs why (e.g. a checksum mismatch) and loads nothing
            log.warning("compile cache %s not usable: compiling from scratch", self.path)
            return False
        log.info("compile cache loaded from %s (%d bytes)", self.path, len(data))
        return True

    def save(self) -> int:
        """Write everything this process compiled so far; the bytes written (0: nothing to write). Atomic: a
        worker reading meanwhile sees the old file or the new one, never half of one."""
        import torch

        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None or not artifacts[0]:
            return 0
        data = artifacts[0]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, self.path)
        log.info("compile cache written to %s (%d bytes)", self.path, len(data))
        return len(data)


def sibling_pipeline(pipe):
    """A second pipeline object on the same modules, with its own scheduler (and per-call state)."""
    components = dict(pipe.components)
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    sibling = type(pipe)(**components)
    sibling.set_progress_bar_config(disable=True)
    return sibling


class BackgroundCompile:
    """Compile `pipe`'s denoiser with `backend` in a thread and swap it into `pipe` under `lock`.

    `denoiser(pipe)` gives the eager module; `install(pipe, module)` puts a module in its place (for SDXL: the
    `unet` attribute; for Wan: the transformer inside its CFG-batching wrapper). `warm_up(sibling)` runs one step
    on a sibling pipeline with the compiled module installed: that call compiles it, with the guards a real job
    will meet. `state` goes "compiling" -> "compiled" | "failed"; a compiled module that then fails on a job's
    shapes (`revert_on`) is swapped back out: "compiled" -> "failed".
    """

    def __init__(
        self,
        pipe,
        name: str,
        denoiser: Callable[[object], object],
        install: Callable[[object, object], None],
        backend,
        warm_up: Callable[[object], None],
        lock: threading.Lock,
        cache: CompileCache | None = None,
        fullgraph: bool = True,
        on_failure: Callable[[], None] | None = None,
    ):
        self.pipe, self.name, self.backend = pipe, name, backend
        self.denoiser, self.install = denoiser, install
        self.warm_up, self.lock, self.cache = warm_up, lock, cache
        self.fullgraph, self.on_failure = fullgraph, on_failure
        self.state = "compiling"
        self.error: str | None = None
        self.seconds: float | None = None  # from start to swap
        self.cache_hit = False
        self._done = threading.Event()
        self._eager: object = None  # the module the compiled one replaced
        self._thread = threading.Thread(target=self._run, name=f"compile-{name}", daemon=True)

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """True once the compile is over (compiled or failed)."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        import torch

        started = time.perf_counter()
        try:
            with _COMPILE_LOCK:
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                if self.cache is not None:
                    self.cache_hit = self.cache.load()
                eager = self._eager = self.denoiser(self.pipe)
                compiled = torch.compile(eager, backend=self.backend, fullgraph=self.fullgraph)  # type: ignore[call-overload]
                sibling = sibling_pipeline(self.pipe)
                self.install(sibling, compiled)
                self.warm_up(sibling)
                with self.lock:  # between two jobs: a job never sees the module change under it
                    self.install(self.pipe, compiled)
                self.seconds = time.perf_counter() - started
                self.state = "compiled"
                log.info("%s compiled in %.1f s; jobs now run it compiled", self.name, self.seconds)
                if self.cache is not None:
                    try:
                        self.cache.save()
                    except Exception as exc:  # a full or read-only volume costs the next start, not this one
                        log.warning("compile cache not written: %s", exc)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            log.warning("compiling %s failed, staying eager: %s", self.name, self.error)
            if self.on_failure is not None:
                self.on_failure()
        finally:
            self._done.set()

    def revert_on(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by a job on the compiled module, is torch.compile failing on that job's shapes (a
        backend error, dynamo's recompile limit); if so the eager module goes back in for good, and the caller
        runs the job again. Called by the job, under `lock`."""
        if self.state != "compiled" or not is_compiler_failure(exc):
            return False
        self.install(self.pipe, self._eager)
        self.state, self.error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        log.warning("compiled %s failed on a job, eager from now on: %s", self.name, self.error)
        return True


def is_compiler_failure(exc: BaseException | None) -> bool:
    """An error of torch.compile itself, anywhere along the exception's causes: dynamo (including a backend's
    compile error, InductorError among them) or the recompile limit a fullgraph compile fails on."""
    from torch._dynamo import exc as dynamo

    while exc is not None:
        if isinstance(exc, dynamo.TorchDynamoException | dynamo.FailOnRecompileLimitHit):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
