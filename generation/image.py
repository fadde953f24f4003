"""text2image: SDXL (`StableDiffusionXLPipeline`), and the batches of requests that share one UNet call."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from firegen_core import errors
from firegen_core.contract import TEXT2IMAGE, GenerationRequest

from .capability import (
    DiffusionCapability,
    ProgressFn,
    Runtime,
    StepProgress,
    centred,
    derive_seed,
    kept_dtype,
    make_generator,
    side_to_generate,
)
from .models import IMAGE_HALF_VARIANT

log = logging.getLogger(__name__)


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
                    # A fresh one, never raised: the caught one's traceback holds this frame, whose `self` holds
                    # it: a cycle that kept the stopped call's latents and embeddings until a garbage collection
                    # (an audit), out of reach of the out-of-memory retry's freeing too.
                    self.cancelled[index] = type(cancelled)()
        first = self.cancelled[self.running[0]] if self.running else None
        if first is not None and all(self.cancelled[index] is not None for index in self.running):
            raise type(first)()  # nobody left to run for: stop the pipeline now
        return {}


class ImagePipeline(DiffusionCapability):
    """text2image: SDXL. Image i of a request uses its own generator seeded seed+i, so it can be redone alone."""

    PROMPT_TOKENIZERS = (("tokenizer", None), ("tokenizer_2", None))  # SDXL's two CLIP encoders, 77 tokens each
    task_type = TEXT2IMAGE
    tiny_kind = "sdxl"
    SIDE_MULTIPLE = 8  # SDXL's VAE: other sides are generated to the next multiple and cropped (`centred`)
    role = "Image"
    HALF_VARIANT = IMAGE_HALF_VARIANT
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
        # The VAE decodes a call's images one at a time: a batch of jobs (BATCH_MAX of up to 4 images each) decoded
        # at once needs a few GiB per 1024x1024 image. One image already fills the GPU, so this costs nothing
        # measurable; the lean retry of a decode adds tiling.
        pipe.vae.enable_slicing()
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
        once every request is cancelled. Out of memory, the part that ran out runs once more, leaner: the
        denoising one image at a time, or the decode in tiles (from the denoised latents)."""
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
                            negative_prompt=_negative(item.request),
                        )
                        for item in items
                    ]
                encoded.extend(None if column[0] is None else torch.cat(column) for column in zip(*parts))
            return encoded

        def call(rows: slice) -> Any:
            """The denoised latents of `rows`: the decode is done apart (`decode_latents`), so that one that runs
            out of memory is tried again alone, never costing the batch's denoising again."""
            prompt, negative, pooled, negative_pooled = (
                None if tensor is None else tensor[rows] for tensor in embeddings()
            )
            return self.pipe(
                prompt_embeds=prompt,
                negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                width=side_to_generate(first.width, self.SIDE_MULTIPLE),
                height=side_to_generate(first.height, self.SIDE_MULTIPLE),
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                num_images_per_prompt=1,
                generator=[make_generator(seed) for seed in seeds[rows]],
                callback_on_step_end=progress.on_step_end,
                output_type="latent",
            ).images

        def normal() -> list:
            progress.start(parts=[1] * len(items), running=list(range(len(items))))
            return list(call(slice(None)))

        def lean() -> list:
            progress.start(parts=counts, running=[])
            latents: list = []
            for row, owner in enumerate(owners):
                if progress.cancelled[owner] is not None:
                    latents.append(None)
                    continue
                progress.running = [owner]
                try:
                    latents += call(slice(row, row + 1))
                except errors.Interrupted:
                    if all(c is not None for c in progress.cancelled):
                        raise
                    latents.append(None)
                    continue
                progress.steps[owner].next_part()
            return latents

        def decode(latents: list) -> list:
            # A cancelled job's rows are not decoded: nobody will see them.
            rows = [
                row
                for row, owner in enumerate(owners)
                if latents[row] is not None and progress.cancelled[owner] is None
            ]
            images: list = [None] * len(owners)
            if rows:
                decoded = decode_latents(self.pipe, torch.stack([latents[row] for row in rows]))
                for row, image in zip(rows, decoded):
                    images[row] = _cropped(image, first.width, first.height)
            return images

        with self._lock:  # the denoising and its decode, with no other job between them
            latents = self._leaner_once(normal, lean)
            images = self._leaner_once(lambda: decode(latents), lambda: decode(latents))
        results: list[list | errors.Interrupted] = []
        for index, count in enumerate(counts):
            start = sum(counts[:index])
            results.append(progress.cancelled[index] or images[start : start + count])
        return results


def _cropped(image, width: int, height: int):
    """The middle `width` x `height` of a PIL image generated at the next multiples (`side_to_generate`)."""
    if image.size == (width, height):
        return image
    columns, rows = centred(image.width, width), centred(image.height, height)
    return image.crop((columns.start, rows.start, columns.stop, rows.stop))


def decode_latents(pipe, latents) -> list:
    """PIL images: what `StableDiffusionXLPipeline.__call__` does after its last step with `output_type="pil"`
    (diffusers 0.42), done apart so that a decode that runs out of memory is tried again alone."""
    import torch

    vae = pipe.vae
    # SDXL's float16 VAE overflows: the pipeline decodes in float32 (`force_upcast`), and back to float16 after,
    # however the decode ends (one that failed mid-way left it float32, and every later image job failed).
    with torch.no_grad(), kept_dtype(vae):
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(dtype=torch.float32)
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        watermark = getattr(pipe, "watermark", None)  # None unless invisible-watermark is installed
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


def prepare_unet_for_compile(pipe, backend) -> None:
    """Fused QKV projections (and inductor's recipe for the UNet's 1x1 convolutions), which the compiled UNet
    builds on, as bench/gpu.py's compiled step measures them: on an H100, 2.4 s -> 1.2 s per 1024x1024 image."""
    pipe.fuse_qkv_projections()
    if backend == "inductor":
        from torch._inductor import config as inductor_config

        inductor_config.conv_1x1_as_mm = True


def _negative(request: GenerationRequest) -> str | None:
    """A blank negative prompt is none, as the contract's clients mean it: SDXL encodes "" (CLIP's empty text)
    where it zeroes a missing one (`force_zeros_for_empty_prompt`), and the two made different images (a review)."""
    text = request.negative_prompt
    return text if text and text.strip() else None
