"""The generation engine: a validated request in, encoded files out. No Firebase here.

`Engine` owns one `ImagePipeline` and one `VideoPipeline`, each loaded at most once per process (at start with
`preload`, in the background with `preload_later`, else on the first job that needs it), picks the device and
dtype, draws the seed when the request has none, and encodes the outputs (PNG, MP4) with `generation.media`. `generate_batch` runs text2image jobs of
one `batch_key` in one UNet batch; `compile_states` says which models still run eagerly while they compile.

Configuration from the environment, validated by `generation.settings.ModelSettings` (`EngineConfig.from_settings`):
- `IMAGE_MODEL`, `VIDEO_MODEL`: a hub id, a local folder, `tiny`, or `none` to turn the capability off
  (its jobs then fail with ModelNotAvailable).
- `FIREGEN_DEVICE` (`cuda`, `cuda:1`, `cpu`; default: CUDA when present), `FIREGEN_DTYPE` (`bfloat16`,
  `float16`, `float32`; default: bfloat16 on CUDA, float32 on CPU).
- `FIREGEN_OFFLOAD_TEXT_ENCODER` (`auto`, `on`, `off`; default `auto`: on for a CUDA card under 40 GiB): keep Wan's
  10.6 GiB UMT5 text encoder in pinned CPU memory and copy it in whole (non-blocking) for each video's prompt
  encoding, so SDXL and Wan fit a 24 GB card together.
- `FIREGEN_COMPILE` (`auto`, `on`, `off`; default `auto`: on for CUDA, off on a CPU): `torch.compile` of SDXL's
  UNet (fused QKV) and Wan's transformer, compiled in the background while jobs run eagerly, then swapped in
  (generation.compiling); a compiler failure stays eager. 2.4 s -> 1.2 s per 1024x1024 image on an H100.
- `FIREGEN_COMPILE_CACHE`: folder of torch's portable compile cache (default: /runpod-volume/firegen-compile
  when the network volume is mounted, else $HF_HOME/firegen-compile; `off`: none).
- `FIREGEN_FP8` (`on`, `off`; default off): SDXL's UNet and Wan's transformer in float8 (torchao, dynamic, row-wise;
  lossy, opt-in). Where it can't run (CPU, a card before Ada, torchao missing) start-up refuses in one line.
- `FIREGEN_ATTENTION_BACKEND` (default `auto`: FlashAttention 3 / 2 when installed for the card, else torch's
  SDPA): the attention backend of Wan's transformer (diffusers' attention dispatcher).
- `FIREGEN_VIDEO_CACHE` (`off`, `firstblock`; default off) and `FIREGEN_VIDEO_CACHE_THRESHOLD` (default 0.05):
  Wan's lossy step caching (diffusers' First Block Cache).
- `FIREGEN_PRELOAD=1`: load both models when the engine is built instead of on first use.
- `FIREGEN_CACHE`: where `tiny` pipelines are built (default `~/.cache/firegen`).
- `HF_HUB_OFFLINE=1`: load hub ids from the local Hugging Face cache only.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from firegen_core import errors
from firegen_core.contract import TEXT2IMAGE, TEXT2VIDEO, GenerationRequest

from . import fp8, media, video_speed
from .capability import DiffusionCapability, ProgressFn, Runtime, resolve_seed
from .compiling import default_cache_dir
from .image import (
    BatchItem,
    ImagePipeline,
    batch_key,  # noqa: F401  (re-exported: the listener groups queued jobs with it)
)
from .models import DISABLED, IMAGE_MODEL_DEFAULT, VIDEO_MODEL_DEFAULT
from .settings import ModelSettings, model_settings
from .video import VideoPipeline

log = logging.getLogger(__name__)

CAPABILITIES: dict[str, type[DiffusionCapability]] = {TEXT2IMAGE: ImagePipeline, TEXT2VIDEO: VideoPipeline}


_AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def _fp8(settings: ModelSettings) -> bool:
    """FIREGEN_FP8: on where it can't run is refused here, at start-up, in one line (FP8 is lossy: there is no
    auto, it is only ever asked for)."""
    if settings.fp8 != "on":
        return False
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if reason := fp8.refusal(device, settings.dtype):
        raise ValueError(reason)
    return True


def _attention(settings: ModelSettings) -> str:
    video_speed.attention_backend(settings.attention_backend, "cpu")  # an unknown name is refused at start-up
    return settings.attention_backend


def _compile_cache(settings: ModelSettings) -> str | None:
    value = settings.compile_cache or default_cache_dir({"HF_HOME": settings.hf_home or ""})
    return None if value.lower() in ("off", "0", "false", "no", DISABLED) else value


@dataclass(frozen=True)
class EngineConfig:
    image_model: str = IMAGE_MODEL_DEFAULT
    video_model: str = VIDEO_MODEL_DEFAULT
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # None: bfloat16 (float16 without bf16 support) on CUDA, float32 on CPU
    preload: bool = False
    cache_dir: str | None = None  # for `tiny` pipelines; None: $FIREGEN_CACHE or ~/.cache/firegen
    local_files_only: bool = False
    offload_text_encoder: bool | None = None  # None: auto (Runtime.detect)
    compile: bool | None = None  # None: auto (on for CUDA)
    compile_cache: str | None = None  # None: no persistent compile cache
    fp8: bool = False  # FIREGEN_FP8 (generation.fp8); refused where it can't run
    attention_backend: str = "auto"  # FIREGEN_ATTENTION_BACKEND (generation.video_speed)
    video_cache_threshold: float | None = None  # FIREGEN_VIDEO_CACHE=firstblock, FIREGEN_VIDEO_CACHE_THRESHOLD

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> EngineConfig:
        """The engine's configuration from the validated model settings (`generation.settings`)."""
        return cls(
            image_model=settings.image_model,
            video_model=settings.video_model,
            device=settings.device,
            dtype=settings.dtype,
            preload=settings.preload == "on",
            cache_dir=settings.cache_dir,
            local_files_only=settings.hf_hub_offline == "on",
            offload_text_encoder=_AUTO_ON_OFF[settings.offload_text_encoder],
            compile=_AUTO_ON_OFF[settings.compile],
            compile_cache=_compile_cache(settings),
            fp8=_fp8(settings),
            attention_backend=_attention(settings),
            video_cache_threshold=video_speed.parse_video_cache(settings.video_cache, settings.video_cache_threshold),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **defaults: str) -> EngineConfig:
        """From the environment (or `environ` alone); `defaults` by field name apply to unset variables.
        Raises generation.settings.SettingsError (a ValueError) naming a wrong variable."""
        return cls.from_settings(model_settings(environ, **defaults))

    def model_ref(self, task_type: str) -> str:
        return self.image_model if task_type == TEXT2IMAGE else self.video_model

    def enabled(self, task_type: str) -> bool:
        return self.model_ref(task_type).strip().lower() != DISABLED


class OutputFile(NamedTuple):
    data: bytes
    extension: str  # "png" | "mp4"
    content_type: str  # "image/png" | "video/mp4"


@dataclass(frozen=True)
class Timings:
    load_seconds: float = 0.0  # model loading this job waited for (0 once loaded)
    generate_seconds: float = 0.0
    encode_seconds: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    task_type: str
    seed: int
    files: list[OutputFile]
    width: int
    height: int
    video_info: dict | None = None
    timings: Timings = field(default_factory=Timings)
    prompt_truncated: bool = False  # a text encoder took only the start of the prompt


def quiet_loading() -> None:
    """No loading progress bars from diffusers/transformers: they would flood logs and command output. Their
    warnings go to the root logger (the worker's JSON lines), not to their own plain-text stderr handlers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()
    # torch's own loggers (torch, torch._dynamo, torch._inductor, symbolic shapes, ...) get a plain-text stderr
    # handler and no propagation at torch's import (torch._logging): the background compile's warnings, and what
    # torchao's import says with FIREGEN_FP8=on, came out as `W1206 11:58:14.077000 ...] ...`, a line per line.
    # Not where an operator asked torch for its own output (TORCH_LOGS, TORCH_LOGS_OUT): it comes at DEBUG, which the
    # worker's handler (LOG_LEVEL, INFO by default) drops, and TORCH_LOGS_OUT's file handler would be taken out.
    if not (os.environ.get("TORCH_LOGS") or os.environ.get("TORCH_LOGS_OUT")):
        from torch._logging import _internal as torch_logs

        for name in torch_logs.log_registry.get_log_qnames():
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.propagate = True
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_the_torchvision_fallback)


def _not_the_torchvision_fallback(record: logging.LogRecord) -> bool:
    """Drops transformers' word that an image processor falls back to its PIL twin without torchvision: the
    pipelines import CLIP's and SigLIP's processors, which no text-to-image or text-to-video job uses, and the
    image has no torchvision, so every start logged two WARNING lines an alert on severity would page for."""
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


# A CUDA error that is not out-of-memory leaves the CUDA context unusable (an illegal access, a device-side
# assert, an ECC error, a fallen-off-the-bus card): every later job on this process would fail too.
_DEVICE_FAILURE_MARKERS = (
    "cuda error",
    "device-side assert",
    "illegal memory access",
    "cublas_status",
    "cudnn_status",
    "uncorrectable ecc",
    "unspecified launch failure",
)


def is_device_failure(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from (a pipeline classifies what torch raised into a
    GenerationError), says the accelerator itself is broken (not out of memory: that one is the job's)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _says_device_failed(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _says_device_failed(exc: BaseException) -> bool:
    if errors.is_out_of_memory(exc):  # the job's: tried leaner, on the same device
        return False
    text = str(exc).lower()
    if type(exc).__name__ == "AcceleratorError":  # torch.AcceleratorError: CUDA errors since torch 2.8
        return True
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _DEVICE_FAILURE_MARKERS)


def _not_loaded(task_type: str) -> errors.ModelNotAvailable:
    return errors.ModelNotAvailable(f"{CAPABILITIES[task_type].role} model not loaded")


class Engine:
    """Runs jobs on this process's models. Safe to call from several threads; jobs run one at a time per model."""

    calls_on_generated = True  # `generate`'s `on_generated`, before the encoding (listener/runner.py asks)

    def __init__(self, config: EngineConfig | None = None, runtime: Runtime | None = None):
        self.config = config or EngineConfig()
        if not self.config.fp8:
            fp8.quiet_unused_import()  # before any model loads: loading imports torchao
        self.runtime = runtime or Runtime.detect(
            self.config.device,
            self.config.dtype,
            self.config.offload_text_encoder,
            self.config.compile,
            self.config.compile_cache,
            self.config.fp8,
            self.config.attention_backend,
            self.config.video_cache_threshold,
        )
        self._pipelines: dict[str, DiffusionCapability] = {}
        # One per model: a job whose model failed to load tries again without waiting on the other's load.
        self._load_locks = {task_type: threading.Lock() for task_type in CAPABILITIES}
        self._loading: set[str] = set()  # in `preload_later`'s hands, not yet loaded or failed
        if self.config.preload:
            for task_type, failure in self.preload().items():
                log.error("model_not_available", extra={"task_type": task_type, "error": failure.message})

    def preload(self, task_types: Iterable[str] = CAPABILITIES) -> dict[str, errors.GenerationError]:
        """Load every enabled model of `task_types` (default: all) now. Returns the failures instead of raising
        them, so one model missing doesn't stop the worker serving the other; a failed load is tried again by the
        next job that needs it."""
        failures = {}
        for task_type in task_types:
            if self.config.enabled(task_type):
                try:
                    self.pipeline(task_type)
                except errors.GenerationError as failure:
                    failures[task_type] = failure
                finally:
                    self._loading.discard(task_type)
        return failures

    def preload_later(
        self, task_types: Iterable[str], on_end: Callable[[dict[str, errors.GenerationError]], None]
    ) -> threading.Thread:
        """`preload` on a thread of its own, then `on_end` with its failures: `loading` says which models it has
        yet to load (or fail), from this call on."""
        pending = [task_type for task_type in task_types if self.config.enabled(task_type)]
        self._loading.update(pending)
        thread = threading.Thread(
            target=lambda: on_end(self.preload(pending)), name=f"load-{'+'.join(pending)}", daemon=True
        )
        thread.start()
        return thread

    def loading(self, task_type: str) -> bool:
        """Whether `preload_later` has yet to load the model of `task_type` (its jobs would wait for it)."""
        return task_type in self._loading

    def check_device(self) -> None:
        """The fitness check: a small computation on the engine's device, read back (which synchronises).
        Raises when the device cannot compute."""
        import torch

        size = 64
        ones = torch.ones(size, size, device=self.runtime.device)
        total = (ones @ ones).sum().item()
        if total != size**3:
            raise RuntimeError(f"device check on {self.runtime.device}: computed {total}, expected {size**3}")

    def loaded(self, task_type: str) -> bool:
        return task_type in self._pipelines

    def compile_states(self) -> dict[str, str]:
        """Per loaded model: "eager" (not compiling), "compiling" (serving eagerly meanwhile), "compiled", "failed"."""
        return {
            task_type: pipeline.compiler.state if pipeline.compiler else "eager"
            for task_type, pipeline in list(self._pipelines.items())  # a load may add one meanwhile
        }

    def pipeline(self, task_type: str) -> DiffusionCapability:
        """The loaded pipeline for `task_type`, loading it on first use; ModelNotAvailable if it can't be."""
        if not self.config.enabled(task_type):
            raise _not_loaded(task_type)
        loaded = self._pipelines.get(task_type)
        if loaded is not None:  # not behind the lock: a failing model's reload (minutes for Wan) holds it
            return loaded
        with self._load_locks[task_type]:
            if task_type not in self._pipelines:
                self._pipelines[task_type] = CAPABILITIES[task_type].load(
                    self.config.model_ref(task_type),
                    self.runtime,
                    cache_dir=self.config.cache_dir,
                    local_files_only=self.config.local_files_only,
                )
            return self._pipelines[task_type]

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        *,
        on_generated: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """Run one job. Raises GenerationError (contract error types) or errors.Interrupted from `progress`.
        `on_generated`: called once the device is done with it, before its files are encoded (CPU work, a video's
        seconds of it, that the next job's generation may overlap)."""
        started = time.perf_counter()
        pipeline = self.pipeline(request.task_type)
        loaded = time.perf_counter()
        seed = resolve_seed(request.seed)
        cut = pipeline.prompt_cut(request.prompt)
        output = pipeline.generate(request, seed, progress)
        if on_generated is not None:
            on_generated()
        # A video's encode takes seconds with no step in it: the job's progress, at its end already, is asked
        # again before each frame, so that a job that must stop (cancelled, released) stops there too.
        still_wanted = functools.partial(progress, 1.0) if progress is not None else None
        marks = (started, loaded, time.perf_counter())
        return self._finish(request, seed, output, pipeline.role, marks, still_wanted, cut=cut)

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        progress: list[ProgressFn | None] | None = None,
        *,
        on_generated: Callable[[], None] | None = None,
    ) -> list[GenerationResult | errors.GenerationError | errors.Interrupted]:
        """Run text2image jobs of one `batch_key` in one pipeline call, each with its own prompt, seed and
        `progress[i]`. Per job, in order: its result (the same images as `generate` would give, to within
        rounding), or the GenerationError / errors.Interrupted it ended with, so the caller fails or drops that job
        alone. ValueError if the requests don't share a `batch_key`. `on_generated`: as for `generate`."""
        progress = progress or [None] * len(requests)
        started = time.perf_counter()
        try:
            pipeline = self.pipeline(TEXT2IMAGE)
            assert isinstance(pipeline, ImagePipeline)  # batches are text2image only (batch_key)
            loaded = time.perf_counter()
            seeds = [resolve_seed(request.seed) for request in requests]
            cuts = [pipeline.prompt_cut(request.prompt) for request in requests]
            items = [BatchItem(*item) for item in zip(requests, seeds, progress, strict=True)]
            outputs = pipeline.generate_batch(items)
        except (errors.GenerationError, errors.Interrupted) as failure:
            return [failure] * len(requests)
        if on_generated is not None:
            on_generated()
        marks = (started, loaded, time.perf_counter())
        results: list[GenerationResult | errors.GenerationError | errors.Interrupted] = []
        for request, seed, output, cut in zip(requests, seeds, outputs, cuts):
            try:
                results.append(
                    output
                    if isinstance(output, errors.Interrupted)
                    else self._finish(request, seed, output, pipeline.role, marks, cut=cut)
                )
            except errors.GenerationError as failure:
                results.append(failure)
        return results

    def _finish(
        self,
        request: GenerationRequest,
        seed: int,
        output,
        role: str,
        marks: tuple,
        between_frames: Callable[[], None] | None = None,
        *,
        cut: bool = False,
    ) -> GenerationResult:
        """Encode `output`; `marks`: when the job started, its model was there and its generation ended; `cut`: its
        prompt was longer than a text encoder takes."""
        started, loaded, generated = marks
        try:
            files, width, height, info = self._encode(request, output, between_frames)
        except Exception as exc:
            raise errors.classify(exc, during=f"{role.lower()} encoding") from exc
        timings = Timings(loaded - started, generated - loaded, time.perf_counter() - generated)
        return GenerationResult(request.task_type, seed, files, width, height, info, timings, prompt_truncated=cut)

    @staticmethod
    def _encode(
        request: GenerationRequest, output, between_frames: Callable[[], None] | None = None
    ) -> tuple[list[OutputFile], int, int, dict | None]:
        if request.is_video:
            count, height, width, _ = output.shape
            mp4 = media.encode_mp4(output, request.fps, between_frames=between_frames)
            files = [OutputFile(mp4, *media.MP4)]
            return files, width, height, media.video_info(count, request.fps, width, height)
        width, height = output[0].size
        if len(output) == 1:
            pngs = [media.encode_png(output[0])]
        else:  # at once: Pillow compresses without the GIL (a 1024x1024 PNG is ~0.25 s of zlib)
            with ThreadPoolExecutor(len(output), thread_name_prefix="encode") as pool:
                pngs = list(pool.map(media.encode_png, output))
        return [OutputFile(png, *media.PNG) for png in pngs], width, height, None
