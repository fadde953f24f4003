"""The model backends: one class per capability, each wrapping one diffusers pipeline loaded once per process.

- `ImagePipeline`: text2image with `StableDiffusionXLPipeline`.
- `VideoPipeline`: text2video with `WanPipeline` (Wan 2.1).

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
from firegen_core.contract import TEXT2IMAGE, TEXT2VIDEO, GenerationRequest

from . import fp8 as fp8_support
from . import tiny, video_speed
from .compiling import BackgroundCompile, CompileCache

log = logging.getLogger(__name__)

IMAGE_MODEL_DEFAULT = "stabilityai/stable-diffusion-xl-base-1.0"
VIDEO_MODEL_DEFAULT = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
TINY = "tiny"
DISABLED = "none"

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


def make_generator(seed: int):
    """A CPU generator: diffusers draws the initial noise on it and moves it to the device, so a seed gives the
    same starting noise on any GPU or on the CPU."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


# --- device and dtype -------------------------------------------------------------------------------------


# Both models resident with the encoder on the GPU peak at 29 GiB while Wan runs (H100, bench/gpu.py); offloaded,
# at 21 GiB. Bigger cards keep it resident: offloading adds seconds to every video.
OFFLOAD_BELOW_GIB = 40


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
        if dtype is None:
            if not cuda:
                dtype = "float32"  # half precision on CPU is slow and poorly supported
            else:
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if compile is None:
            compile = cuda
        if fp8 and (reason := fp8_support.refusal(device)):
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

    Reported fractions only ever increase: after an out-of-memory retry starts over, nothing is reported until
    the retry passes the furthest point already reported.
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
        return {}


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
            options = {_dtype_keyword(): runtime.torch_dtype}
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
        model = f"{self.role.lower()}-fp8" if self.runtime.fp8 else self.role.lower()
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

    # The shapes the background compile warms up, in order (the first: the contract's default job).
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
        during = f"{self.role.lower()} generation"
        with self._lock:
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


def batch_key(request: GenerationRequest) -> tuple | None:
    """Requests with equal keys can share one UNet batch (`ImagePipeline.generate_batch`): same size, steps and
    guidance; prompts, negative prompts, seeds and image counts may differ. None: never batched (videos: one
    Wan video already fills a GPU). One process has one model per task, so the model is implied."""
    if request.task_type != TEXT2IMAGE:
        return None
    return (request.task_type, request.width, request.height, request.num_inference_steps, request.guidance_scale)


@dataclass
class BatchItem:
    """One request of a batch: its seed (already resolved) and its own progress callback."""

    request: GenerationRequest
    seed: int
    progress: ProgressFn | None = None


class _BatchProgress:
    """Per-request progress for a batch sharing one pipeline call. A request whose callback raises
    `errors.Interrupted` (lease lost) is marked cancelled and its callback is not called again; the pipeline call
    goes on for the others and is only stopped once every request is cancelled."""

    def __init__(self, items: list[BatchItem]):
        self.steps = [StepProgress(item.progress) for item in items]
        self.cancelled: list[errors.Interrupted | None] = [None] * len(items)
        self.running: list[int] = list(range(len(items)))  # the requests with rows in the current call

    def start(self, parts: list[int], running: list[int]) -> None:
        for index, step in enumerate(self.steps):
            step.start(parts[index])
        self.running = running

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        for index in self.running:
            if self.cancelled[index] is None:
                try:
                    self.steps[index].on_step_end(pipe, step, timestep, callback_kwargs)
                except errors.Interrupted as cancelled:
                    self.cancelled[index] = cancelled
        first = self.cancelled[self.running[0]] if self.running else None
        if first is not None and all(self.cancelled[index] is not None for index in self.running):
            raise first  # nobody left to run for: stop the pipeline now
        return {}


class ImagePipeline(DiffusionCapability):
    """text2image: SDXL. Image i of a request uses its own generator seeded seed+i, so it can be redone alone."""

    task_type = TEXT2IMAGE
    tiny_kind = "sdxl"
    role = "Image"
    # SDXL publishes fp16 files: the image bakes those (half the bytes to read at a cold start; generation.prefetch)
    HALF_VARIANT = "fp16"
    VARIANT_PROBE = "unet/diffusion_pytorch_model.safetensors"

    @staticmethod
    def denoiser(pipe):
        return pipe.unet

    @staticmethod
    def install_denoiser(pipe, module) -> None:
        pipe.unet = module

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def place(cls, pipe, runtime: Runtime) -> None:
        super().place(pipe, runtime)
        if runtime.is_cuda:
            import torch

            pipe.unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores

    def prepare_compile(self) -> None:
        prepare_unet_for_compile(self.pipe, self.runtime.compile_backend)

    # (width, height, images, guidance) of the compile warm-up, in order; jobs of a shape no graph covers run
    # eagerly. SDXL's native job (1024x1024, one image with CFG: a UNet batch of 2) compiles first, the one graph
    # with static shapes (the fastest, and bench.gpu's figure); the second shape differs in height, width and batch
    # and compiles them dynamic (dynamo's automatic dynamic shapes), which then serves the contract's default
    # 512x512 and other sizes that are multiples of 32, image counts and batches of jobs. A latent side that is no multiple of
    # 4 (an image side that is no multiple of 32, e.g. 800x600) takes another branch in diffusers' UNet, decided
    # on the height first, then the width: a graph each. A UNet batch of 1 (one image without CFG, guidance 1.0:
    # distilled models such as SDXL-Turbo) is a graph of its own, since dynamo never makes a dimension of size 1
    # dynamic: the last two shapes compile it, dynamic in height and width. No two sides are equal: dynamo would
    # give them one symbol, and the graph would serve square images alone.
    WARM_UP_SHAPES = (
        (1024, 1024, 1, 7.5),
        (768, 512, 2, 7.5),
        (768, 744, 1, 7.5),
        (1000, 768, 1, 7.5),
        (768, 512, 1, 1.0),
        (1024, 768, 1, 1.0),
    )

    def compile_warm_up(self, sibling, shape: tuple) -> None:
        width, height, images, guidance = shape
        sibling(
            prompt="warm-up",
            width=width,
            height=height,
            num_images_per_prompt=images,
            num_inference_steps=1,
            guidance_scale=guidance,
            output_type="latent",
        )

    def generate(self, request: GenerationRequest, seed: int, progress: ProgressFn | None = None) -> list:
        """`request.num_images_per_prompt` PIL images of `request.width` x `request.height`."""
        [images] = self.generate_batch([BatchItem(request, seed, progress)])
        if isinstance(images, errors.Interrupted):
            raise images
        return images

    def generate_batch(self, items: list[BatchItem]) -> list[list | errors.Interrupted]:
        """Several requests of one `batch_key` in one pipeline call (the UNet runs on all their images at once):
        per request, its images (as `generate` would give them, to within rounding) or the `errors.Interrupted`
        its progress raised. Each prompt is encoded alone, exactly as an unbatched call would, so requests with
        and without a negative prompt share a batch. Raises GenerationError for the whole batch, and Interrupted
        once every request is cancelled. Out of memory: once more, one image at a time with a lean VAE."""
        import torch

        keys = {batch_key(item.request) for item in items}
        if len(keys) != 1 or None in keys:
            raise ValueError(f"requests that cannot share a batch: {sorted(map(str, keys))}")
        first = items[0].request
        counts = [item.request.num_images_per_prompt for item in items]
        owners = [index for index, count in enumerate(counts) for _ in range(count)]  # request of each row
        seeds = [derive_seed(item.seed, i) for item in items for i in range(item.request.num_images_per_prompt)]
        progress = _BatchProgress(items)
        encoded: list = []

        def embeddings() -> list:
            """prompt, negative, pooled, negative pooled: one row per image, in request order."""
            if not encoded:
                cfg = first.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
                with torch.no_grad():
                    parts = [
                        self.pipe.encode_prompt(
                            item.request.prompt,
                            device=self.pipe._execution_device,
                            num_images_per_prompt=item.request.num_images_per_prompt,
                            do_classifier_free_guidance=cfg,
                            negative_prompt=item.request.negative_prompt,
                        )
                        for item in items
                    ]
                encoded.extend(None if column[0] is None else torch.cat(column) for column in zip(*parts))
            return encoded

        def call(rows: slice) -> list:
            prompt, negative, pooled, negative_pooled = (
                None if tensor is None else tensor[rows] for tensor in embeddings()
            )
            return self.pipe(
                prompt_embeds=prompt,
                negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                width=first.width,
                height=first.height,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                num_images_per_prompt=1,
                generator=[make_generator(seed) for seed in seeds[rows]],
                callback_on_step_end=progress.on_step_end,
            ).images

        def normal() -> list:
            progress.start(parts=[1] * len(items), running=list(range(len(items))))
            return call(slice(None))

        def lean() -> list:
            progress.start(parts=counts, running=[])
            images: list = []
            for row, owner in enumerate(owners):
                if progress.cancelled[owner] is not None:
                    images.append(None)
                    continue
                progress.running = [owner]
                try:
                    images += call(slice(row, row + 1))
                except errors.Interrupted:
                    if all(c is not None for c in progress.cancelled):
                        raise
                    images.append(None)
                    continue
                progress.steps[owner].next_part()
            return images

        images = self._run(normal, lean)
        results: list[list | errors.Interrupted] = []
        for index, count in enumerate(counts):
            start = sum(counts[:index])
            results.append(progress.cancelled[index] or images[start : start + count])
        return results


def prepare_unet_for_compile(pipe, backend) -> None:
    """Fused QKV projections (and inductor's recipe for the UNet's 1x1 convolutions), which the compiled UNet
    builds on, as bench/gpu.py's compiled step measures them: on an H100, 2.4 s -> 1.2 s per 1024x1024 image."""
    pipe.fuse_qkv_projections()
    if backend == "inductor":
        from torch._inductor import config as inductor_config

        inductor_config.conv_1x1_as_mm = True


WAN_TEXT_TOKENS = 512


def frames_to_generate(num_frames: int, temporal_factor: int) -> int:
    """The smallest k * temporal_factor + 1 >= num_frames: the frame counts Wan's causal VAE produces."""
    return -(-(num_frames - 1) // temporal_factor) * temporal_factor + 1


def offload_text_encoder(pipe, device: str, *, use_stream: bool, blocks_per_group: int = 1) -> None:
    """Keep `pipe.text_encoder` in CPU memory and bring it to `device` a few blocks at a time while it runs
    (diffusers' group offloading; with `use_stream`, pinned memory and the next group's copy overlapping the
    current group's compute). The pipeline's execution device stays `device`."""
    from diffusers.hooks import apply_group_offloading

    pipe.text_encoder.to("cpu")
    apply_group_offloading(
        pipe.text_encoder,
        onload_device=device,
        offload_device="cpu",
        offload_type="block_level",
        num_blocks_per_group=blocks_per_group,
        use_stream=use_stream,
    )


class VideoPipeline(DiffusionCapability):
    """text2video: Wan 2.1. Produces exactly `num_frames` frames (generating the next 4k+1 and trimming)."""

    task_type = TEXT2VIDEO
    tiny_kind = "wan"
    role = "Video"

    @staticmethod
    def denoiser(pipe):
        return video_speed.denoiser(pipe.transformer)

    @staticmethod
    def install_denoiser(pipe, module) -> None:
        pipe.transformer = video_speed.cfg_batched(module)  # a fresh wrapper: no state from the eager one

    @classmethod
    def pipeline_class(cls):
        from diffusers import WanPipeline

        return WanPipeline

    @classmethod
    def place(cls, pipe, runtime: Runtime) -> None:
        cls.place_modules(pipe, runtime)
        transformer = video_speed.denoiser(pipe.transformer)
        video_speed.set_attention_backend(transformer, runtime.attention_backend)
        if runtime.video_cache_threshold:
            video_speed.apply_step_cache(transformer, runtime.video_cache_threshold)
        if not video_speed.is_cfg_batched(pipe.transformer):
            video_speed.batch_cfg(pipe)  # a step's two passes (prompt, negative prompt) as one batch

    @classmethod
    def place_modules(cls, pipe, runtime: Runtime) -> None:
        if not runtime.is_cuda:
            DiffusionCapability.place(pipe, runtime)
            return
        import torch

        if runtime.offload_text_encoder:
            # UMT5-XXL is 10.6 GiB in bf16 (more than the transformer and VAE together) and runs once per video:
            # kept in pinned CPU memory and copied in whole for the prompt encoding, so one worker holding SDXL and
            # Wan fits a 24 GB card (bench/gpu.py measures both the memory and the cost).
            video_speed.swap_text_encoder(pipe, runtime.device)
        else:
            pipe.text_encoder.to(runtime.device)
        pipe.transformer.to(runtime.device)
        # As Wan's reference code and diffusers' Wan examples do: transformer in half precision, VAE in
        # float32 (the pipeline casts the latents to the VAE's dtype before decoding).
        pipe.vae.to(runtime.device, torch.float32)

    def warm_up(self) -> None:
        if self.runtime.compile_backend and self.runtime.video_cache_threshold:
            # First Block Cache decides in Python, per step, whether to run the other blocks. Under torch.compile
            # its decisions differed from eager's (tiny Wan, threshold 0.5: 18.2 dB against the full run, eager
            # 21.7 dB, while the compiled full run equals the eager one): the cached transformer stays eager.
            log.info("video step cache on: Wan's transformer is not compiled")
            return
        super().warm_up()

    # (width, height, frames, guidance) of the compile warm-up, in order, as ImagePipeline's: the contract's default
    # video (CFG: prompt and negative prompt in one transformer batch of 2), then another size and length, which
    # makes them dynamic; then the same two without CFG (guidance 1.0: a batch of 1, a graph of its own).
    WARM_UP_SHAPES = ((512, 512, 16, 5.0), (832, 480, 33, 5.0), (512, 512, 16, 1.0), (832, 480, 33, 1.0))

    def compile_warm_up(self, sibling, shape: tuple) -> None:
        """With zero text embeddings: the text encoder (perhaps offloaded through hooks and a stream of its own) is
        left to the jobs."""
        import torch

        video_width, video_height, frames, guidance = shape
        width = self.pipe.text_encoder.config.d_model
        # WanPipeline.__call__'s max_sequence_length: prompts are padded to 512 tokens.
        embeds = torch.zeros(1, WAN_TEXT_TOKENS, width, device=self.runtime.device, dtype=self.pipe.transformer.dtype)
        sibling.transformer.negative = embeds  # what batch_cfg's capture of encode_prompt does in a job
        sibling(
            prompt_embeds=embeds,
            negative_prompt_embeds=embeds,
            width=video_width,
            height=video_height,
            num_frames=frames_to_generate(frames, self.pipe.vae_scale_factor_temporal),
            num_inference_steps=1,
            guidance_scale=guidance,
            output_type="latent",
        )

    def generate(self, request: GenerationRequest, seed: int, progress: ProgressFn | None = None) -> Any:
        """A uint8 array (num_frames, video_height, video_width, 3)."""
        from .media import to_uint8_frames

        steps = StepProgress(progress)
        frames = frames_to_generate(request.num_frames, self.pipe.vae_scale_factor_temporal)

        def run(batched: bool) -> Any:
            steps.start(parts=1)
            if video_speed.is_cfg_batched(self.pipe.transformer):
                self.pipe.transformer.batching = batched  # the leaner retry runs the two passes one by one
            return self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.video_width,
                height=request.video_height,
                num_frames=frames,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.video_guidance_scale,
                generator=make_generator(seed),
                output_type="np",
                callback_on_step_end=steps.on_step_end,
            ).frames[0]

        video = to_uint8_frames(self._run(lambda: run(True), lambda: run(False))[: request.num_frames])
        expected = (request.num_frames, request.video_height, request.video_width, 3)
        if video.shape != expected:
            raise errors.GenerationError(
                errors.RUNTIME_ERROR, f"Processing error during video generation: got {video.shape}, not {expected}"
            )
        return video
