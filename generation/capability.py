"""What both model backends share: one diffusers pipeline per capability, loaded once per process.

`DiffusionCapability` is the base of `generation.image.ImagePipeline` (text2image, SDXL) and
`generation.video.VideoPipeline` (text2video, Wan 2.1); `Runtime` says where and in what precision they run.

A model reference is a hub id, a local folder, or `tiny` (random-weight pipelines of the real architectures built
by `generation.tiny`, for tests and machines without the weights). Whatever goes wrong while loading becomes
`ModelNotAvailable`; whatever goes wrong while generating becomes a `GenerationError` via `errors.classify`,
after one leaner retry if it was running out of memory. `errors.Interrupted` from a progress callback passes
through untouched. torch and diffusers are imported when a model loads, not when this module does.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from firegen_core import errors
from firegen_core.contract import GenerationRequest

from . import fp8 as fp8_support
from . import tiny, video_speed
from .compiling import BackgroundCompile, CompileCache, model_tag
from .models import TINY

log = logging.getLogger(__name__)


RANDOM_SEED_LIMIT = 2**32  # a drawn seed fits every client's number type
_UINT64 = 2**64
_INT64_MIN = -(2**63)
MAX_LOAD_REASON_CHARS = 160

ProgressFn = Callable[[float], None]
T = TypeVar("T")


# --- seeds ------------------------------------------------------------------------------------------------


def resolve_seed(seed: int | None) -> int:
    """The seed a job runs with: the request's, or a fresh random one in 0..2**32-1 (reported to the client)."""
    return secrets.randbelow(RANDOM_SEED_LIMIT) if seed is None else seed


def derive_seed(seed: int, index: int) -> int:
    """Seed of output `index`: seed + index, wrapped into the signed 64-bit range the contract allows."""
    return (seed + index - _INT64_MIN) % _UINT64 + _INT64_MIN


def side_to_generate(side: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= `side`: a size the model takes, cropped to `side` after (`centred`)."""
    return -(-side // multiple) * multiple


def centred(generated: int, wanted: int) -> slice:
    """The middle `wanted` of `generated` pixels: a few more generated on each side than asked cost a crop, not a
    refusal of a size the contract allows (500x500: SDXL takes multiples of 8)."""
    start = (generated - wanted) // 2
    return slice(start, start + wanted)


def make_generator(seed: int):
    """A CPU generator: diffusers draws the initial noise on it and moves it to the device, so a seed gives the
    same starting noise on any GPU or on the CPU."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


# --- device and dtype -------------------------------------------------------------------------------------


# Both models resident with the encoder on the GPU peak at 29 GiB while Wan runs (H100, bench/gpu.py); offloaded,
# at 21 GiB. Bigger cards keep it resident: offloading adds seconds to every video.
OFFLOAD_BELOW_GIB = 40


def _unavailable(torch, device: str) -> str | None:
    """Why FIREGEN_DEVICE's accelerator is not there (torch would say so with a traceback at the first use)."""
    kind, _, index = device.partition(":")
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    module = backend.get(kind)
    if module is None:
        return None
    if not module.is_available():
        return f"FIREGEN_DEVICE is {device} but torch {torch.__version__} sees no {kind} device on this machine"
    count = module.device_count() if hasattr(module, "device_count") else 1
    if index and int(index) >= count:
        return f"FIREGEN_DEVICE is {device} but this machine has {count} {kind} device(s), numbered from 0"
    return None


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the models run. `detect` picks CUDA with bfloat16 when there is a GPU."""

    device: str = "cpu"
    dtype: str = "float32"
    offload_text_encoder: bool = False  # Wan's UMT5-XXL in CPU memory, streamed in while it encodes
    compile_backend: str | None = None  # torch.compile the denoisers with this backend (in the background); None: eager
    compile_cache: str | None = None  # folder of torch's portable compile cache; None: no persistent cache
    fp8: bool = False  # the denoisers' linear layers in float8 (generation.fp8; CUDA, Ada/Hopper, torchao)
    attention_backend: str = "native"  # Wan's transformer, through diffusers' attention dispatcher
    video_cache_threshold: float | None = None  # Wan's First Block Cache (lossy); None: every step computed

    @classmethod
    def detect(
        cls,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool | None = None,
        compile: bool | None = False,
        compile_cache: str | None = None,
        fp8: bool = False,
        attention: str = "auto",
        video_cache_threshold: float | None = None,
    ) -> Runtime:
        """`offload` None: offload Wan's text encoder on a CUDA card with less than OFFLOAD_BELOW_GIB.
        `compile`: inductor on CUDA (None: auto, i.e. on for CUDA); dropped on a CPU, where compiling the
        denoisers takes longer than it saves. `fp8` where it can't run: ValueError, one line naming FIREGEN_FP8."""
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device.startswith("cuda")
        if reason := _unavailable(torch, device):
            raise ValueError(reason)
        if dtype is None:
            if not cuda:
                dtype = "float32"  # half precision on CPU is slow and poorly supported
            else:
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if compile is None:
            compile = cuda
        if fp8 and (reason := fp8_support.refusal(device, dtype)):
            raise ValueError(reason)
        if offload is None:
            offload = cuda and torch.cuda.get_device_properties(device).total_memory < OFFLOAD_BELOW_GIB * 2**30
        return cls(
            device=device,
            dtype=dtype,
            offload_text_encoder=bool(offload and cuda),
            compile_backend="inductor" if compile and cuda else None,
            compile_cache=compile_cache,
            fp8=fp8,
            attention_backend=video_speed.attention_backend(attention, device),
            video_cache_threshold=video_cache_threshold,
        )

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def free_memory(self) -> None:
        import torch

        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()


# --- progress ---------------------------------------------------------------------------------------------


class StepProgress:
    """Turns diffusers' per-step callbacks into fractions 0..1 for a job made of `parts` pipeline runs.

    Reported fractions never go back: after an out-of-memory retry starts over, its steps report the furthest
    point already reported again (a check for a stop) until they pass it; so does a video's decode (`check`).
    """

    def __init__(self, report: ProgressFn | None):
        self.report = report
        self.reported = 0.0
        self.parts = 1
        self.part = 0

    def start(self, parts: int) -> None:
        self.parts, self.part = parts, 0

    def next_part(self) -> None:
        self.part += 1

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        fraction = min(1.0, (self.part + (step + 1) / pipe.num_timesteps) / self.parts)
        if self.report is not None and fraction > self.reported:
            self.reported = fraction
            self.report(fraction)  # may raise errors.Interrupted, which must reach the caller unchanged
        else:  # an out-of-memory retry's steps, short of the furthest reported: a stop still stops them
            self.check()
        return {}

    def check(self, *hook_args: object) -> None:
        """Between steps' worth of work that has no step (a video's decode): the same fraction again, so that a
        job that must stop (cancelled, released) raises errors.Interrupted here too. A forward pre-hook's
        arguments are ignored."""
        if self.report is not None:
            self.report(self.reported)


@contextmanager
def checked_calls(module: Any, check: Callable[..., None]) -> Iterator[None]:
    """`check` before each call of `module` (a forward pre-hook), for the length of the block."""
    handle = module.register_forward_pre_hook(check) if module is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


# --- loading ----------------------------------------------------------------------------------------------


def _looks_like_path(model_ref: str) -> bool:
    return model_ref.startswith(("/", "./", "../", "~")) or Path(model_ref).expanduser().exists()


def _short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_LOAD_REASON_CHARS else text[: MAX_LOAD_REASON_CHARS - 1] + "…"


def resolve_source(model_ref: str, tiny_kind: str, role: str, cache_dir: str | None) -> str:
    """What to hand to `from_pretrained`: a folder for `tiny` and local paths, else the hub id as it is."""
    ref = model_ref.strip()
    if ref.lower() == TINY:
        return str(tiny.ensure(tiny_kind, cache_dir))
    if _looks_like_path(ref):
        folder = Path(ref).expanduser()
        if not (folder / "model_index.json").is_file():
            raise errors.ModelNotAvailable(f"{role} model folder {ref} not found or not a diffusers pipeline")
        return str(folder)
    return ref


def _dtype_keyword() -> str:
    """Recent diffusers (0.42 here) name from_pretrained's precision `dtype` and warn on `torch_dtype`; earlier
    releases that pyproject.toml still allows know only `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


@contextmanager
def lean_vae(vae) -> Iterator[None]:
    """Decode in tiles and one sample at a time for the duration: slower, far less peak memory."""
    was_tiling, was_slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield
    finally:
        # Back to the normal mode, so the next job's output doesn't depend on whether this one ran out of memory.
        if not was_tiling:
            vae.disable_tiling()
        if not was_slicing:
            vae.disable_slicing()


@contextmanager
def kept_dtype(module) -> Iterator[None]:
    """`module`'s dtype as it was, however the block ends. SDXL's pipeline upcasts a float16 VAE to float32 for the
    decode (`force_upcast`) and casts it back only after a decode that worked: one that ran out of memory left it
    float32, and the leaner retry and every later image job failed "Input type (c10::Half) and bias type (float)
    should be the same" (an audit)."""
    dtype = module.dtype
    try:
        yield
    finally:
        if module.dtype != dtype:
            module.to(dtype=dtype)


class DiffusionCapability:
    """One capability backed by one diffusers pipeline: loading, placement and the out-of-memory retry."""

    task_type: ClassVar[str]
    tiny_kind: ClassVar[str]
    role: ClassVar[str]  # "Image" or "Video", for messages

    def __init__(self, pipe, runtime: Runtime, model_ref: str):
        self.pipe = pipe
        self.runtime = runtime
        self.model_ref = model_ref
        # A diffusers pipeline keeps per-call state (scheduler steps, guidance): one call at a time.
        self._lock = threading.Lock()
        self.compiler: BackgroundCompile | None = None

    @classmethod
    def pipeline_class(cls):
        raise NotImplementedError

    def generate(self, request: GenerationRequest, seed: int, progress: ProgressFn | None = None) -> Any:
        """The decoded output of one job (images, or a video's frames); each capability runs its own pipeline."""
        raise NotImplementedError

    # The pipeline's tokenizers whose text encoders cut a prompt, each with the tokens it keeps (None: the
    # tokenizer's `model_max_length`).
    PROMPT_TOKENIZERS: ClassVar[tuple[tuple[str, int | None], ...]] = (("tokenizer", None),)

    def prompt_cut(self, prompt: str) -> bool:
        """Whether a text encoder takes only the start of `prompt` (diffusers cuts the rest, saying so in a log line
        only: the contract's 2,000 characters are far more than CLIP's 77 tokens, about 60 English words, and a CJK
        or emoji prompt takes several tokens a character). Under the pipeline's lock: a fast tokenizer keeps the
        truncation of its last call on itself."""
        with self._lock:
            for name, keeps in self.PROMPT_TOKENIZERS:
                tokenizer = getattr(self.pipe, name, None)
                if tokenizer is not None:
                    tokens = len(tokenizer(prompt, truncation=False)["input_ids"])
                    if tokens > (keeps or tokenizer.model_max_length):
                        return True
        return False

    @classmethod
    def load(
        cls,
        model_ref: str,
        runtime: Runtime,
        *,
        cache_dir: str | None = None,
        local_files_only: bool = False,
    ):
        """Load `model_ref` onto `runtime`; any failure is `ModelNotAvailable` naming the model."""
        try:
            source = resolve_source(model_ref, cls.tiny_kind, cls.role, cache_dir)
            options = {_dtype_keyword(): cls.load_dtype(runtime)}
            variant = cls.weights_variant(source, runtime)
            if variant:
                options["variant"] = variant
            pipe = cls.pipeline_class().from_pretrained(source, local_files_only=local_files_only, **options)
            cls.place(pipe, runtime)
            capability = cls(pipe, runtime, model_ref)
            if runtime.compile_backend:
                # First: fusing SDXL's QKV copies weights into new layers, which float8 weights refuse.
                capability.prepare_compile()
            if runtime.fp8:
                fp8_support.quantize(cls.denoiser(pipe))
            pipe.set_progress_bar_config(disable=True)  # per-step bars would flood the worker's logs
            capability.warm_up()
        except errors.ModelNotAvailable:
            raise
        except Exception as exc:
            reason = _short_reason(exc)
            raise errors.ModelNotAvailable(f"{cls.role} model {model_ref} is not available: {reason}") from exc
        return capability

    # The half-precision files a model may publish beside its full ones (`*.fp16.safetensors`), and the file that
    # tells whether a local copy has them.
    HALF_VARIANT: ClassVar[str | None] = None
    VARIANT_PROBE: ClassVar[str] = ""

    @classmethod
    def load_dtype(cls, runtime: Runtime) -> Any:
        """`from_pretrained`'s precision: the runtime's, every component alike."""
        return runtime.torch_dtype

    @classmethod
    def weights_variant(cls, source: str, runtime: Runtime) -> str | None:
        """The variant to load: the half-precision files when they are on disk (a folder, or the Hugging Face
        cache the image bakes) and the run is in half precision, or when they are the only files there."""
        if not cls.HALF_VARIANT:
            return None
        half, full = (cls.VARIANT_PROBE.replace(".safetensors", f".{cls.HALF_VARIANT}.safetensors"), cls.VARIANT_PROBE)
        if Path(source).is_dir():
            has_half, has_full = ((Path(source) / name).is_file() for name in (half, full))
        else:
            from huggingface_hub import try_to_load_from_cache

            has_half, has_full = (isinstance(try_to_load_from_cache(source, name), str) for name in (half, full))
        return cls.HALF_VARIANT if has_half and (runtime.dtype in ("float16", "bfloat16") or not has_full) else None

    def warm_up(self) -> None:
        """At load: with a compile backend, start compiling the denoiser in the background (`self.compiler`);
        jobs run eagerly until the compiled module is swapped in (generation.compiling)."""
        if not self.runtime.compile_backend:
            return
        runtime = self.runtime
        config = self.denoiser(self.pipe).config
        model = model_tag(self.role.lower(), runtime.dtype, runtime.fp8, runtime.attention_backend, config)
        cache = (
            CompileCache(self.runtime.compile_cache, self.runtime.device, model) if self.runtime.compile_cache else None
        )
        self.compiler = BackgroundCompile(
            self.pipe,
            self.role.lower(),
            self.denoiser,
            self.install_denoiser,
            self.runtime.compile_backend,
            self.compile_warm_up,
            self.WARM_UP_SHAPES,
            self._lock,
            cache,
            on_failure=self.runtime.free_memory,
        ).start()

    @staticmethod
    def denoiser(pipe):
        """The module that is compiled and quantized: SDXL's UNet, Wan's transformer."""
        raise NotImplementedError

    @staticmethod
    def install_denoiser(pipe, module) -> None:
        raise NotImplementedError

    def prepare_compile(self) -> None:
        """Changes to the eager modules that the compiled ones build on (made at load, before FP8 and serving)."""

    # The shapes the background compile warms up, in order (the first: the model's own reference job, SDXL's
    # 1024x1024 image, Wan's the contract's default video).
    WARM_UP_SHAPES: ClassVar[tuple[tuple, ...]] = ()

    def compile_warm_up(self, sibling, shape: tuple) -> None:
        """One step of `shape` (one of WARM_UP_SHAPES) on `sibling`, a pipeline sharing this one's modules with its
        denoiser compiling: it compiles the graph whose guards the jobs of that shape pass."""
        raise NotImplementedError

    @classmethod
    def place(cls, pipe, runtime: Runtime) -> None:
        # diffusers' attention processors already call torch's scaled_dot_product_attention (flash or
        # memory-efficient kernels on CUDA); nothing to switch on here.
        pipe.to(runtime.device)

    def _run(self, normal: Callable[[], T], lean: Callable[[], T]) -> T:
        """Run `normal`; if it runs out of memory, free what can be freed and run `lean` once."""
        with self._lock:
            return self._leaner_once(normal, lean)

    def _leaner_once(self, normal: Callable[[], T], lean: Callable[[], T]) -> T:
        """`_run`'s retry, for a caller that holds the lock (a job of several such steps, none to be run again
        for another's running out)."""
        during = f"{self.role.lower()} generation"
        try:
            return normal()
        except Exception as exc:
            if errors.classify(exc).error_type != errors.OUT_OF_MEMORY:
                raise errors.classify(exc, during=during) from exc
        # Outside the except block, so the failed attempt's traceback (and the tensors its frames hold)
        # is already released when the cache is emptied.
        self.runtime.free_memory()
        try:
            with lean_vae(self.pipe.vae):
                return lean()
        except Exception as exc:
            raise errors.classify(exc, during=during) from exc
        finally:
            self.runtime.free_memory()
