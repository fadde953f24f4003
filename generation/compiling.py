"""Compiling a pipeline's denoiser (SDXL's UNet, Wan's transformer) off the request path, with a portable cache.

A worker must be ready in seconds, and `torch.compile` of SDXL's UNet takes ~106 s cold on an H100. So the
capability loads and serves eagerly at once; a `BackgroundCompile` thread compiles the denoiser by running one
warm-up step per shape on a second pipeline object that shares the same modules (own scheduler and tokenizers, own
per-call state: it never touches the pipeline jobs run on). Once the first shape (the model's reference job) is compiled, jobs
switch, between two jobs, to a run-only module (`torch._dynamo.run`): it runs the compiled graphs whose guards a
job's inputs pass, and the eager module for any other shape. So a job never compiles on its own time (a recompile
of SDXL's UNet takes a minute or more on a GPU, under the pipeline's lock, with every later job waiting), and each
further warm-up shape serves jobs as soon as it is compiled. Whatever goes wrong while compiling is logged: a
failed first shape leaves the eager module in place, a failed later one leaves its shape eager.

`CompileCache`: torch's portable "mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`,
inductor's compiled kernels and AOTAutograd graphs in one blob). Loaded before compiling, so a warm cache turns
the compile into cache hits; written after each warm-up shape that adds to it, so a worker stopped half-way (a
serverless worker scaled down when the queue drains) still leaves what it compiled, and a fully warmed-up one
leaves the whole set. One file per model (its precision, FP8, attention backend and architecture: `model_tag`), torch and diffusers
version and device name (artifacts from another of these never serve, and are simply never read). Put it on the network volume (`FIREGEN_COMPILE_CACHE`)
so every worker of an endpoint shares it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NETWORK_VOLUME = "/runpod-volume"
# dynamo's limit on the graphs of one function (8 by default), past which a fullgraph compile fails. A worker's
# denoiser has one per warm-up shape, and every compile in the process counts towards it (each test's pipeline, in
# the test suite).
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


def model_tag(role: str, dtype: str, fp8: bool, attention_backend: str, config: Mapping) -> str:
    """A model's name in its cache file: what its compiled code depends on beyond torch, diffusers and the GPU. The
    precision and the architecture (the denoiser's config: Wan 1.3B and 14B differ; its weights do not matter, so
    fine-tunes share) and the attention backend: two endpoints sharing a volume with other settings loaded each
    other's artifacts, useless, and overwrote the file at each cold start (an audit). Config entries named `_...`
    (the weights' path, diffusers' version) say nothing of the code."""
    architecture = {name: value for name, value in dict(config).items() if not name.startswith("_")}
    described = json.dumps({"config": architecture, "attention": attention_backend}, sort_keys=True, default=str)
    return "-".join([role, dtype, *(["fp8"] if fp8 else []), hashlib.sha256(described.encode()).hexdigest()[:10]])


class CompileCache:
    """torch's portable compile artifacts of one model (`model`: `model_tag`'s, e.g. "video-bfloat16-fp8-<hash>") in one file under
    `folder`. `save` takes what the process recorded since `recording()` began: compiled, or loaded and hit."""

    def __init__(self, folder: str | Path, device: str = "cpu", model: str = "model"):
        import diffusers
        import torch

        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
        tag = f"torch-{torch.__version__}-diffusers-{diffusers.__version__}-{name}-{model}"
        self.path = Path(folder).expanduser() / f"{re.sub(r'[^A-Za-z0-9.+-]+', '_', tag)}.bin"
        self.in_file = 0  # artifacts in the file as this process last loaded or wrote it
        self.written: int | None = None  # artifacts this process last wrote

    @staticmethod
    def recording():
        """A context in which the process records this model's artifacts alone (torch keeps one global record,
        and the other model's compile would otherwise land in this model's file). One compile at a time."""
        try:
            from torch.compiler._cache import CacheArtifactManager

            return CacheArtifactManager.with_fresh_cache()
        except (ImportError, AttributeError):  # a torch without it: the global record, as save_cache_artifacts reads
            return contextlib.nullcontext()

    def load(self) -> bool:
        """Hot-load the artifacts, if the file is there. False (and a log line) when absent or unreadable."""
        import torch

        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            log.info("compile_cache_missing", extra={"path": str(self.path), "action": "compile from scratch"})
            return False
        except OSError as exc:
            log.warning("compile_cache_not_loaded", extra={"path": str(self.path), "error": _short(exc)})
            return False
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # a truncated or foreign file: compile from scratch, overwrite it afterwards
            log.warning(
                "compile_cache_not_loaded",
                extra={"path": str(self.path), "error": _short(exc), "action": "compile from scratch"},
            )
            return False
        if info is None:  # torch logs why (e.g. a checksum mismatch) and loads nothing
            log.warning(
                "compile_cache_not_loaded",
                extra={"path": str(self.path), "error": "torch loaded none of it", "action": "compile from scratch"},
            )
            return False
        self.in_file = _count(info)
        log.info("compile_cache_loaded", extra={"path": str(self.path), "bytes": len(data), "artifacts": self.in_file})
        return True

    def save(self, final: bool = True) -> int:
        """Write the artifacts recorded so far; the bytes written (0: nothing written). Before the warm-up's end
        (`final` False) only when they outnumber the file's, so a worker stopped half-way never shrinks a fuller
        file another worker left; at its end whenever they differ from what this process last wrote (a stale
        file, from code that traces other graphs, is then replaced). Atomic: a worker reading meanwhile sees the
        old file or the new one, never half of one."""
        import torch

        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None or not artifacts[0]:
            return 0
        data, info = artifacts
        count = _count(info)
        if count == self.written or (not final and count <= self.in_file):
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, self.path)
        self.in_file = self.written = count
        log.info("compile_cache_written", extra={"path": str(self.path), "bytes": len(data), "artifacts": count})
        return len(data)


def _count(info) -> int:
    """The artifacts a CacheInfo lists."""
    return sum(len(keys) for keys in info.artifacts.values())


def sibling_pipeline(pipe):
    """A second pipeline object on the same modules (weights), with its own copy of every other component and its
    own per-call state. Tokenizers especially: a fast tokenizer sets its padding and truncation on itself for each
    call, so two threads on one tokenizer mix them, and SDXL's `encode_prompt` pads to the maximum length, then
    encodes again padded to the longest to check for truncation (a job running while the warm-up encoded its
    prompt failed "Sizes of tensors must match", or the warm-up did and the worker stayed eager)."""
    import torch

    components = {
        name: value if value is None or isinstance(value, torch.nn.Module) else copy.deepcopy(value)
        for name, value in pipe.components.items()
    }
    sibling = type(pipe)(**components)
    sibling.set_progress_bar_config(disable=True)
    return sibling


class BackgroundCompile:
    """Compile `pipe`'s denoiser with `backend` in a thread, one warm-up shape after another, and serve it to jobs.

    `denoiser(pipe)` gives the eager module; `install(pipe, module)` puts a module in its place (for SDXL: the
    `unet` attribute; for Wan: the transformer inside its CFG-batching wrapper). `warm_up(sibling, shape)` runs one
    step of `shape` on a sibling pipeline with the compiling module installed: that call compiles a graph with the
    guards a job of that shape meets. After the first shape, `pipe` gets the run-only module (under `lock`, between
    two jobs). `state` goes "compiling" -> "compiled" | "failed" (the first shape failed: eager for good);
    `shapes` lists the shapes compiled so far; `wait()` returns once every shape has been tried.
    """

    def __init__(
        self,
        pipe,
        name: str,
        denoiser: Callable[[object], object],
        install: Callable[[object, object], None],
        backend,
        warm_up: Callable[[object, tuple], None],
        shapes: Sequence[tuple],
        lock: threading.Lock,
        cache: CompileCache | None = None,
        fullgraph: bool = True,
        on_failure: Callable[[], None] | None = None,
    ):
        if not shapes:
            raise ValueError("a background compile needs at least one warm-up shape")
        self.pipe, self.name, self.backend = pipe, name, backend
        self.denoiser, self.install = denoiser, install
        self.warm_up, self.pending, self.lock, self.cache = warm_up, tuple(shapes), lock, cache
        self.fullgraph, self.on_failure = fullgraph, on_failure
        self.state = "compiling"
        self.error: str | None = None
        self.seconds: float | None = None  # from start to the first shape served compiled
        self.cache_hit = False
        self.shapes: list[tuple] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"compile-{name}", daemon=True)

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """True once the compile is over: every shape compiled or given up, or the first one failed."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        import torch

        started = time.perf_counter()
        try:
            with _COMPILE_LOCK, CompileCache.recording():
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                if self.cache is not None:
                    self.cache_hit = self.cache.load()
                eager = self.denoiser(self.pipe)
                compiling = torch.compile(eager, backend=self.backend, fullgraph=self.fullgraph)  # type: ignore[call-overload]
                sibling = sibling_pipeline(self.pipe)
                self.install(sibling, compiling)
                first, *rest = self.pending
                self.warm_up(sibling, first)
                self.shapes.append(first)
                self._save(final=False)
                # Run-only: the graphs compiled so far and those compiled later (dynamo keeps them on the code
                # object both modules run), the eager module where no graph's guards pass; never a compile.
                serving = torch._dynamo.run(eager)  # type: ignore[arg-type]
                with self.lock:  # between two jobs: a job never sees the module change under it
                    self.install(self.pipe, serving)
                self.seconds = time.perf_counter() - started
                self.state = "compiled"
                # Jobs run it compiled from here on.
                log.info("model_compiled", extra={"model": self.name, "compile_seconds": round(self.seconds, 1)})
                for shape in rest:
                    try:
                        self.warm_up(sibling, shape)
                    except Exception as exc:
                        log.warning(
                            "compile_shape_failed",
                            extra={
                                "model": self.name,
                                "shape": list(shape),
                                "error": _short(exc),
                                "action": "run it eagerly",
                            },
                        )
                    else:
                        self.shapes.append(shape)
                        self._save(final=False)
                log.info(
                    "compile_warm_up_done",
                    extra={"model": self.name, "shapes": len(self.shapes), "of": len(self.pending)},
                )
                self._save(final=True)
        except Exception as exc:
            self.state, self.error = "failed", _short(exc)
            log.warning("compile_failed", extra={"model": self.name, "error": self.error, "action": "stay eager"})
            if self.on_failure is not None:
                self.on_failure()
        finally:
            self._done.set()

    def _save(self, final: bool) -> None:
        if self.cache is None:
            return
        try:
            self.cache.save(final)
        except Exception as exc:  # a full or read-only volume costs the next start, not this one
            log.warning("compile_cache_not_written", extra={"path": str(self.cache.path), "error": _short(exc)})


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
