"""text2video: Wan 2.1 (`WanPipeline`), with its text encoder's offload for cards under 40 GiB."""

from __future__ import annotations

import logging
from typing import Any

from firegen_core import errors
from firegen_core.contract import TEXT2VIDEO, GenerationRequest

from . import video_speed
from .capability import (
    DiffusionCapability,
    ProgressFn,
    Runtime,
    StepProgress,
    centred,
    checked_calls,
    make_generator,
    side_to_generate,
)
from .models import VIDEO_HALF_VARIANT

log = logging.getLogger(__name__)

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


def decode_latents(pipe, latents) -> Any:
    """Frames as floats in [0, 1], (videos, frames, height, width, 3): what `WanPipeline.__call__` does after its
    last step with `output_type="np"` (diffusers 0.42), done apart so that a decode that runs out of memory is
    tried again alone."""
    import torch

    vae = pipe.vae
    with torch.no_grad():  # as the pipeline's own call
        latents = latents.to(vae.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")


class VideoPipeline(DiffusionCapability):
    """text2video: Wan 2.1. Produces exactly `num_frames` frames of `video_width` x `video_height` (generating the
    next 4k+1 frames and the next multiples of 16 in size, and trimming)."""

    PROMPT_TOKENIZERS = (("tokenizer", WAN_TEXT_TOKENS),)  # T5, cut at the pipeline's max_sequence_length
    task_type = TEXT2VIDEO
    tiny_kind = "wan"
    SIDE_MULTIPLE = 16  # Wan's VAE (8) times its patch (2): other sides are generated to the next one and cropped
    role = "Video"
    HALF_VARIANT = VIDEO_HALF_VARIANT

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
    def load_dtype(cls, runtime: Runtime) -> Any:
        """The VAE loaded in float32, as Wan's reference code and diffusers' Wan examples load it: loaded in half
        precision and cast up after (`place_modules`), its weights kept their rounding (a review: 25 dB between the
        two decodes of the same latents, tiny Wan)."""
        import torch

        return {"default": runtime.torch_dtype, "vae": torch.float32}

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
        if self.runtime.compile_backend and getattr(
            video_speed.denoiser(self.pipe.transformer), "is_cache_enabled", False
        ):
            # First Block Cache decides in Python, per step, whether to run the other blocks. Under torch.compile
            # its decisions differed from eager's (tiny Wan, threshold 0.5: 18.2 dB against the full run, eager
            # 21.7 dB, while the compiled full run equals the eager one): the cached transformer stays eager.
            log.info("compile_skipped", extra={"model": "video", "reason": "video step cache on"})
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
        # What batch_cfg's capture of encode_prompt does in a job: a job without CFG has no negative embeddings,
        # so its transformer batch is of 1 (with them here, the no-CFG shapes compiled the CFG batch again).
        negative = embeds if guidance > 1 else None
        sibling.transformer.negative = negative
        sibling(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            width=video_width,
            height=video_height,
            num_frames=frames_to_generate(frames, self.pipe.vae_scale_factor_temporal),
            num_inference_steps=1,
            guidance_scale=guidance,
            output_type="latent",
        )

    def generate(self, request: GenerationRequest, seed: int, progress: ProgressFn | None = None) -> Any:
        """A uint8 array (num_frames, video_height, video_width, 3). Out of memory, the part that ran out runs
        once more, leaner: the denoising with its two passes one by one, or the decode in tiles (from the
        denoised latents: a decode that runs out never costs the whole denoising again)."""
        from .media import to_uint8_frames

        steps = StepProgress(progress)
        frames = frames_to_generate(request.num_frames, self.pipe.vae_scale_factor_temporal)

        def denoise(batched: bool) -> Any:
            steps.start(parts=1)
            video_speed.reset_step_cache(self.pipe.transformer)  # nothing of an earlier video's steps
            if video_speed.is_cfg_batched(self.pipe.transformer):
                self.pipe.transformer.batching = batched  # the leaner retry runs the two passes one by one
            return self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=side_to_generate(request.video_width, self.SIDE_MULTIPLE),
                height=side_to_generate(request.video_height, self.SIDE_MULTIPLE),
                num_frames=frames,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.video_guidance_scale,
                generator=make_generator(seed),
                output_type="latent",
                callback_on_step_end=steps.on_step_end,
            ).frames

        def decode(latents) -> Any:
            # The VAE decodes a latent frame (or tile) per call of its decoder, for seconds after the last step:
            # a cancel then stops it at the next call, not after the whole decode and encode (audit: 10 s).
            # Here, under the pipeline's lock: a waiting job's check must never run in this one's decode.
            with checked_calls(getattr(self.pipe.vae, "decoder", None), steps.check):
                try:
                    return decode_latents(self.pipe, latents)[0]
                finally:
                    # A decode stopped mid-way keeps its frame cache (GiBs of activations at the contract's
                    # sizes, on the card) until the next decode clears it: the next jobs need that memory now.
                    clear_cache = getattr(self.pipe.vae, "clear_cache", None)
                    if callable(clear_cache):
                        clear_cache()

        with self._lock:  # the denoising and its decode, with no other job between them
            latents = self._leaner_once(lambda: denoise(True), lambda: denoise(False))
            decoded = self._leaner_once(lambda: decode(latents), lambda: decode(latents))
        video = to_uint8_frames(decoded[: request.num_frames])
        video = video[:, centred(video.shape[1], request.video_height), centred(video.shape[2], request.video_width)]
        expected = (request.num_frames, request.video_height, request.video_width, 3)
        if video.shape != expected:
            raise errors.GenerationError(
                errors.RUNTIME_ERROR, f"Processing error during video generation: got {video.shape}, not {expected}"
            )
        return video
