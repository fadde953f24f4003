"""The generation engine on the tiny random-weight SDXL and Wan pipelines (real architectures, real loading).

Sizes and step counts are kept small so the whole file runs in seconds on two CPU cores; the contract-sized
cases (256x320, 16 and 17 frames) still run once each.
"""

from __future__ import annotations

import io
import json
import re
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, WanPipeline
from fixtures_generation import PROMPT, image_request, video_request
from PIL import Image

from firegen_core import contract, errors
from generation import __main__ as cli
from generation import media, tiny
from generation.capability import Runtime, derive_seed, resolve_seed
from generation.compiling import default_cache_dir
from generation.engine import Engine, EngineConfig, is_device_failure
from generation.image import decode_latents as image_decode_latents
from generation.video import decode_latents, frames_to_generate

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


# --- images -----------------------------------------------------------------------------------------------


def test_image_sizes_and_count_from_a_contract_request(engine):
    request = contract.parse_runsync_input(
        {
            "prompt": PROMPT,
            "use_cloud_storage": False,
            "width": 260,  # SDXL takes multiples of 8: generated at 264 and cropped
            "height": 320,
            "num_images_per_prompt": 2,
            "num_inference_steps": 10,
            "seed": 7,
        }
    )
    result = engine.generate(request)
    assert (result.task_type, result.seed, result.width, result.height) == ("text2image", 7, 260, 320)
    assert [(ext, kind) for _, ext, kind in result.files] == [("png", "image/png")] * 2
    for data, _, _ in result.files:
        assert Image.open(io.BytesIO(data)).size == (260, 320)
    assert result.video_info is None
    assert result.timings.generate_seconds > 0


def test_a_jobs_images_are_encoded_at_once(engine, monkeypatch):
    """A latency audit: a 4-image job's PNGs were compressed one after another (~0.25 s each at 1024x1024). Two
    encodes that never meet at once time the barrier out."""
    together, encode = threading.Barrier(2, timeout=10), media.encode_png

    def at_once(image):
        together.wait()
        return encode(image)

    monkeypatch.setattr(media, "encode_png", at_once)
    result = engine.generate(image_request(num_images_per_prompt=2, num_inference_steps=1))
    monkeypatch.undo()
    alone = [engine.generate(image_request(seed=derive_seed(1234, i), num_inference_steps=1)) for i in range(2)]
    assert [f.data for f in result.files] == [r.files[0].data for r in alone]  # each its own, in order


@pytest.mark.parametrize("call", ["image", "batch", "video"])
def test_on_generated_is_said_once_the_device_is_done_before_the_files_are_encoded(engine, monkeypatch, call):
    """The worker hands a job's slot to the next claim at `on_generated`: the encoding (a 1024x1024 PNG ~0.15 s of
    zlib on this CPU, a video's MP4 seconds) is CPU work the next job's generation may overlap."""
    said: list[str] = []
    for name in ("encode_png", "encode_mp4"):
        encode = getattr(media, name)
        monkeypatch.setattr(
            media, name, lambda *args, encode=encode, **kwargs: said.append("encoded") or encode(*args, **kwargs)
        )
    generated = lambda: said.append("generated")  # noqa: E731
    if call == "batch":
        results = engine.generate_batch([image_request(), image_request(seed=7)], on_generated=generated)
        assert all(result.files for result in results)
    elif call == "video":
        assert engine.generate(video_request(), on_generated=generated).files
    else:
        assert engine.generate(image_request(), on_generated=generated).files
    assert said[0] == "generated" and said.count("generated") == 1 and "encoded" in said


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(engine):
    first, again = engine.generate(image_request()), engine.generate(image_request())
    assert first.files[0].data == again.files[0].data
    assert engine.generate(image_request(seed=99)).files[0].data != first.files[0].data


def test_each_image_is_reproducible_alone_from_seed_plus_index(engine):
    pair = engine.generate(image_request(num_images_per_prompt=2))
    alone = engine.generate(image_request(seed=1234 + 1))
    # A batch of two and a batch of one sum floats in a different order on the CPU: at most 1 level apart.
    assert np.abs(pixels(pair.files[1].data) - pixels(alone.files[0].data)).max() <= 1
    assert np.abs(pixels(pair.files[0].data) - pixels(pair.files[1].data)).mean() > 5  # not the same image


def test_a_missing_seed_is_drawn_and_reported(engine):
    result = engine.generate(image_request(seed=None))
    assert 0 <= result.seed < 2**32
    assert engine.generate(image_request(seed=result.seed)).files[0].data == result.files[0].data


def test_seeds_wrap_into_the_signed_64_bit_range():
    assert derive_seed(INT64_MAX, 1) == INT64_MIN
    assert derive_seed(-5, 2) == -3
    assert resolve_seed(42) == 42


def test_the_largest_seed_with_several_images_runs(engine):
    result = engine.generate(image_request(seed=INT64_MAX, num_images_per_prompt=2, num_inference_steps=1))
    assert result.seed == INT64_MAX and len(result.files) == 2


def test_a_side_sdxl_cannot_take_is_generated_to_the_next_it_can_and_cropped_to_the_middle(engine):
    pipeline = engine.pipeline("text2image")
    [whole] = pipeline.generate(image_request(width=64, height=48), 1234)
    [cropped] = pipeline.generate(image_request(width=58, height=41), 1234)  # generated at 64x48
    assert cropped.size == (58, 41)
    assert np.array_equal(np.asarray(cropped), np.asarray(whole.crop((3, 3, 61, 44))))


# --- video ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [16, 17])
def test_video_has_exactly_the_requested_frames_size_and_fps(engine, num_frames):
    # 250 wide: Wan takes multiples of 16, so it is generated 256 wide and cropped
    result = engine.generate(video_request(num_frames=num_frames, fps=12, video_width=250, video_height=256))
    ((data, ext, content_type),) = result.files
    assert (ext, content_type) == ("mp4", "video/mp4")
    probe = media.probe_mp4(data)
    assert (probe.frames, probe.fps, probe.width, probe.height) == (num_frames, 12, 250, 256)
    assert result.video_info == {
        "frames": num_frames,
        "fps": 12,
        "duration_seconds": num_frames / 12,
        "width": 250,
        "height": 256,
    }
    assert (result.width, result.height, result.task_type) == (250, 256, "text2video")


def test_a_video_side_wan_cannot_take_is_generated_to_the_next_it_can_and_cropped_to_the_middle(engine):
    pipeline = engine.pipeline("text2video")
    whole = pipeline.generate(video_request(), 1234)  # 64x48
    cropped = pipeline.generate(video_request(video_width=54, video_height=34), 1234)  # generated at 64x48
    assert cropped.shape == (16, 34, 54, 3)
    assert np.array_equal(cropped, whole[:, 7:41, 5:59])


def test_video_same_seed_gives_identical_frames_and_bytes(engine):
    pipeline = engine.pipeline("text2video")
    frames = pipeline.generate(video_request(), 1234)
    assert np.array_equal(pipeline.generate(video_request(), 1234), frames)
    request = video_request(video_width=256, video_height=256, num_inference_steps=2)
    assert engine.generate(request).files[0].data == engine.generate(request).files[0].data
    # A small clip too: this one (64x48), encoded 30 times by x264 with AVX-512, gave 3 files (generation.media).
    assert len({media.encode_mp4(frames, 8) for _ in range(20)}) == 1


# Compiling (in the background, with a cache): tests/test_compiling.py.


def test_an_offloaded_text_encoder_gives_the_same_video(engine, tiny_cache):
    """On CUDA the UMT5 encoder lives in CPU memory and streams in while it encodes (VideoPipeline.place); here
    the same diffusers hooks run CPU to CPU without a stream: the pipeline still finds its execution device and
    the frames are identical to the resident encoder's."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from generation.video import VideoPipeline, offload_text_encoder

    offloaded = VideoPipeline.load("tiny", Runtime())
    offload_text_encoder(offloaded.pipe, "cpu", use_stream=False, blocks_per_group=1)
    assert _is_group_offload_enabled(offloaded.pipe.text_encoder)
    resident = engine.pipeline("text2video")
    assert np.array_equal(offloaded.generate(video_request(), 5), resident.generate(video_request(), 5))


def test_a_prompt_longer_than_the_text_encoder_takes_is_reported_cut(engine):
    """The unicode review: SDXL's CLIP encoders take 77 tokens (the tiny tokenizer: a token per byte), Wan's T5 512
    (the tiny one: about one per character), and diffusers cut the rest, saying so in a log line alone: the
    result says it, the batch's per job."""
    long_image, long_video = "a lighthouse " * 7, "waves " * 120  # 91 bytes; 720 characters
    assert not engine.generate(image_request()).prompt_truncated
    assert engine.generate(image_request(prompt=long_image)).prompt_truncated
    assert not engine.generate(video_request(num_frames=5, num_inference_steps=2)).prompt_truncated
    assert engine.generate(video_request(prompt=long_video, num_frames=5, num_inference_steps=2)).prompt_truncated
    batched = engine.generate_batch([image_request(), image_request(prompt=long_image, seed=7)])
    assert [result.prompt_truncated for result in batched] == [False, True]


@pytest.mark.parametrize(("wanted", "generated"), [(16, 17), (17, 17), (18, 21), (81, 81), (1, 1)])
def test_frames_to_generate_rounds_up_to_the_vae_frame_counts(wanted, generated):
    assert frames_to_generate(wanted, 4) == generated


# --- progress and cancellation ----------------------------------------------------------------------------


@pytest.mark.parametrize("make_request", [image_request, video_request], ids=["image", "video"])
def test_progress_rises_after_every_step_and_ends_at_one(engine, make_request):
    seen = []
    engine.generate(make_request(num_inference_steps=4), progress=seen.append)
    # A video's decode and encode ask the last fraction again (a check for a stop, below): never lower.
    assert [f for n, f in enumerate(seen) if seen[n - 1 : n] != [f]] == [0.25, 0.5, 0.75, 1.0]
    assert seen == sorted(seen)


class StopAt:
    """A job's progress callback that stops it (errors.Interrupted) at its `at`-th report of 1.0: the last step's
    is the first; a video's decode and encode ask it again before each piece of their work."""

    def __init__(self, at: int | None = None):
        self.at, self.ones = at, 0

    def __call__(self, fraction: float) -> None:
        self.ones += fraction == 1.0
        if self.ones == self.at:
            raise errors.Interrupted()


def test_a_video_stops_in_its_decode_or_its_encode_where_its_job_must(engine):
    """The audit: a cancel after a video's last step waited out its whole decode and encode (10 s here, seconds of
    GPU on a card) before the job ended. Each latent frame's decode and each frame's encode asks first."""
    decoder = engine.pipeline("text2video").pipe.vae.decoder
    decoded = []
    counting = decoder.register_forward_hook(lambda *args: decoded.append(1))
    try:
        whole = StopAt()
        full = engine.generate(video_request(), progress=whole)
        calls = len(decoded)
        assert calls > 1 and whole.ones == 1 + calls + 16  # the last step, each decoder call, each of 16 frames
        for at, decoded_before_the_stop in [(2, 0), (3, 1), (2 + calls, calls)]:  # in the decode; its first frame
            decoded.clear()
            with pytest.raises(errors.Interrupted):
                engine.generate(video_request(), progress=StopAt(at))
            assert len(decoded) == decoded_before_the_stop, at
            # The VAE's frame cache (its activations: GiBs on a card) is let go, not kept until the next video.
            assert all(entry is None for entry in engine.pipeline("text2video").pipe.vae._feat_map), at
    finally:
        counting.remove()
    # Stopped mid-decode, the VAE's frame cache is cleared by the next decode: the same video as before.
    assert engine.generate(video_request()).files[0].data == full.files[0].data
    assert decoder._forward_pre_hooks == {}  # the job's checks went with it


def test_encode_mp4_asks_before_each_frame_and_stops_where_told():
    frames = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    asked = []
    assert media.probe_mp4(media.encode_mp4(frames, 8, between_frames=lambda: asked.append(1))).frames == 5
    assert len(asked) == 5

    def stop_at_the_third():
        asked.append(1)
        if len(asked) == 3:
            raise errors.Interrupted()

    asked.clear()
    with pytest.raises(errors.Interrupted):
        media.encode_mp4(frames, 8, between_frames=stop_at_the_third)
    assert len(asked) == 3


def test_interrupted_from_the_progress_callback_propagates_unchanged(engine):
    def cancel_at_second_step(fraction):
        if fraction >= 0.5:
            raise errors.Interrupted()

    with pytest.raises(errors.Interrupted):
        engine.generate(image_request(num_inference_steps=4), progress=cancel_at_second_step)
    assert len(engine.generate(image_request(num_inference_steps=1)).files) == 1  # the pipeline is free again


# --- out of memory ----------------------------------------------------------------------------------------


class FlakyCall:
    """Stands in for a real CUDA out-of-memory (which a CPU can't produce): the pipeline's __call__ raises
    `error` for the first `failures` calls, then runs for real. Records each call's batch size and VAE mode."""

    def __init__(self, original, error: BaseException, failures: int):
        self.original, self.error, self.failures = original, error, failures
        self.calls: list[dict] = []

    def __call__(self, pipe, **kwargs):
        vae, generator = pipe.vae, kwargs["generator"]
        images = len(generator) if isinstance(generator, list) else 1  # one generator per image in a batch
        self.calls.append({"images": images, "lean": vae.use_tiling and vae.use_slicing})
        if len(self.calls) <= self.failures:
            raise self.error
        return self.original(pipe, **kwargs)


def flaky(monkeypatch, pipeline_class, error, failures) -> FlakyCall:
    stand_in = FlakyCall(pipeline_class.__call__, error, failures)
    monkeypatch.setattr(pipeline_class, "__call__", lambda pipe, **kwargs: stand_in(pipe, **kwargs))
    return stand_in


OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory."),
    RuntimeError("CUDA error: out of memory"),
    # cuBLAS on a full card (the GPU-waste review: taken for a broken device, the worker left and the job ran again
    # elsewhere from its start, never tried leaner).
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
]


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["OutOfMemoryError", "RuntimeError", "cuBLAS"])
def test_out_of_memory_retries_once_image_by_image_with_a_lean_vae(engine, monkeypatch, error):
    assert not is_device_failure(error)  # the job's, on this device: no reason for the worker to leave
    stand_in = flaky(monkeypatch, StableDiffusionXLPipeline, error, failures=1)
    seen = []
    result = engine.generate(image_request(num_images_per_prompt=2, num_inference_steps=2), progress=seen.append)
    assert len(result.files) == 2
    assert stand_in.calls == [{"images": 2, "lean": False}, {"images": 1, "lean": True}, {"images": 1, "lean": True}]
    # The retry reports over both images, never going back: its steps short of the furthest point ask that again
    # (a check for a stop: a cancel must not wait out the retry's first half).
    assert [f for n, f in enumerate(seen) if seen[n - 1 : n] != [f]] == [0.25, 0.5, 0.75, 1.0]
    assert seen == sorted(seen)
    vae = engine.pipeline("text2image").pipe.vae
    assert vae.use_slicing and not vae.use_tiling  # back to the normal mode for the next job: one image at a time


def test_a_retrys_steps_short_of_the_furthest_reported_still_ask_for_a_stop():
    """An out-of-memory retry starts over: its steps report nothing new until they pass the first try's furthest
    point, but each asks that point again, so a cancel stops the retry at its next step (a review: it ran on)."""
    from types import SimpleNamespace

    from generation.capability import StepProgress

    asked: list[float] = []
    steps = StepProgress(asked.append)
    pipe = SimpleNamespace(num_timesteps=4)
    for step in range(3):
        steps.on_step_end(pipe, step, None, {})
    steps.start(parts=1)  # the leaner retry
    steps.on_step_end(pipe, 0, None, {})
    assert asked == [0.25, 0.5, 0.75, 0.75]

    def stop(fraction):
        raise errors.Interrupted()

    steps.report = stop
    with pytest.raises(errors.Interrupted):
        steps.on_step_end(pipe, 1, None, {})


def test_video_out_of_memory_retries_once_with_a_lean_vae(engine, monkeypatch):
    stand_in = flaky(monkeypatch, WanPipeline, OOM_ERRORS[0], failures=1)
    result = engine.generate(video_request())
    assert media.probe_mp4(result.files[0].data).frames == 16
    assert [call["lean"] for call in stand_in.calls] == [False, True]


def decode_out_of_memory_once(monkeypatch, vae, note) -> list:
    """`vae.decode` runs out of memory (a stand-in: a CPU has no CUDA memory to run out of) at its first call, then
    decodes; each call's `note()` (the VAE's state then) in the list returned."""
    decode, notes = vae.decode, []

    def first_out_of_memory(*args, **kwargs):
        notes.append(note())
        if len(notes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", first_out_of_memory)
    return notes


def test_a_float16_decode_that_runs_out_of_memory_leaves_the_vae_in_float16(tiny_cache, monkeypatch):
    """An audit: SDXL's pipeline upcasts a float16 VAE to float32 to decode (`force_upcast`, as SDXL base's
    config says) and back only after a decode that worked: one out of memory left it float32, and the retry and
    every later image job failed "Input type (c10::Half) and bias type (float) should be the same"."""
    half = Engine(EngineConfig(image_model="tiny", video_model="none", device="cpu", dtype="float16", preload=True))
    vae = half.pipeline("text2image").pipe.vae
    vae.register_to_config(force_upcast=True)
    request = image_request(num_inference_steps=2)
    before = half.generate(request)
    decodes = decode_out_of_memory_once(monkeypatch, vae, lambda: vae.dtype)
    retried = half.generate(request)
    assert decodes[0] == torch.float32 and vae.dtype == torch.float16  # upcast for the decode, and back
    monkeypatch.undo()
    assert half.generate(request).files[0].data == before.files[0].data
    assert len(retried.files) == 1


def test_a_blank_negative_prompt_is_none(engine):
    """A review: SDXL encodes an empty negative prompt (CLIP's empty text) where it zeroes a missing one, and the
    same seed made another image; the README: an empty `negative_prompt` states none."""
    [none] = engine.generate(image_request()).files
    for blank in ("", "   "):
        assert engine.generate(image_request(negative_prompt=blank)).files[0].data == none.data
    assert engine.generate(image_request(negative_prompt="blurry")).files[0].data != none.data


def test_wans_vae_is_loaded_in_float32_under_a_half_precision_run(tiny_cache):
    """A review: the whole Wan pipeline was loaded in bfloat16 and its VAE cast up to float32 after, its weights
    keeping their rounding (25 dB between the two decodes of the same latents, tiny Wan). As Wan's reference loads
    it: the VAE's weights are the checkpoint's, the transformer in the run's precision."""
    from diffusers import AutoencoderKLWan

    from generation import video_speed
    from generation.capability import resolve_source
    from generation.video import VideoPipeline

    pipe = VideoPipeline.load("tiny", Runtime(dtype="bfloat16")).pipe
    transformer = video_speed.denoiser(pipe.transformer)
    assert torch.bfloat16 in {parameter.dtype for parameter in transformer.parameters()}
    source = resolve_source("tiny", "wan", "Video", None)
    checkpoint = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32).state_dict()
    loaded = pipe.vae.state_dict()
    assert loaded.keys() == checkpoint.keys()
    assert all(torch.equal(loaded[name], weights) for name, weights in checkpoint.items())


def test_a_video_decode_that_runs_out_of_memory_is_decoded_again_alone_in_tiles(engine, monkeypatch):
    """The GPU-waste review: a decode out of memory ran the whole denoising again (minutes on a small card)."""
    normal = engine.generate(video_request())
    denoising = flaky(monkeypatch, WanPipeline, RuntimeError("never raised"), failures=0)
    vae = engine.pipeline("text2video").pipe.vae
    decodes = decode_out_of_memory_once(monkeypatch, vae, lambda: vae.use_tiling)
    seen: list[float] = []
    retried = engine.generate(video_request(), progress=seen.append)
    assert len(denoising.calls) == 1 and decodes == [False, True]  # the decode again, in tiles; no step again
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert retried.files[0].data == normal.files[0].data  # tiles this small are the whole frame: the same video
    assert not vae.use_tiling  # the next job decodes whole again


def test_the_video_decode_done_apart_is_the_pipelines_own(engine):
    """`decode_latents` does what WanPipeline.__call__ does after its last step (diffusers may change it)."""
    pipe = engine.pipeline("text2video").pipe
    options = dict(prompt=PROMPT, width=64, height=48, num_frames=5, num_inference_steps=2)
    own = pipe(**options, generator=torch.Generator().manual_seed(7), output_type="np").frames
    latents = pipe(**options, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    assert np.array_equal(decode_latents(pipe, latents), own)


def test_an_image_decode_that_runs_out_of_memory_is_decoded_again_alone_in_tiles(engine, monkeypatch):
    """As a video's: the images' decode out of memory ran the whole batch's denoising again, image by image."""
    request = image_request(num_images_per_prompt=2, num_inference_steps=2)
    normal = engine.generate(request)
    denoising = flaky(monkeypatch, StableDiffusionXLPipeline, RuntimeError("never raised"), failures=0)
    vae = engine.pipeline("text2image").pipe.vae
    decodes = decode_out_of_memory_once(monkeypatch, vae, lambda: vae.use_tiling)
    seen: list[float] = []
    retried = engine.generate(request, progress=seen.append)
    assert denoising.calls == [{"images": 2, "lean": False}] and decodes == [False, True]  # no step again
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert [f.data for f in retried.files] == [f.data for f in normal.files]  # tiles this small: the whole image
    assert vae.use_slicing and not vae.use_tiling  # the next job decodes whole again, one image at a time


def test_the_image_decode_done_apart_is_the_pipelines_own(engine):
    """`image.decode_latents` does what StableDiffusionXLPipeline.__call__ does after its last step."""
    pipe = engine.pipeline("text2image").pipe
    options = dict(prompt=PROMPT, width=64, height=48, num_images_per_prompt=2, num_inference_steps=2)
    own = pipe(**options, generator=torch.Generator().manual_seed(7)).images
    latents = pipe(**options, generator=torch.Generator().manual_seed(7), output_type="latent").images
    apart = image_decode_latents(pipe, latents)
    assert len(apart) == len(own) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(apart, own))


def test_out_of_memory_twice_fails_as_out_of_memory(engine, monkeypatch):
    stand_in = flaky(monkeypatch, StableDiffusionXLPipeline, OOM_ERRORS[0], failures=2)
    with pytest.raises(errors.GenerationError) as failure:
        engine.generate(image_request())
    assert failure.value.error_type == errors.OUT_OF_MEMORY
    assert failure.value.message == "CUDA Out of Memory during image generation"  # the contract's example
    assert len(stand_in.calls) == 2


def test_the_out_of_memory_message_names_cuda_where_the_gpus_memory_ran_out():
    during = {"during": "video generation"}
    cuda = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ]
    for exc in cuda:
        assert errors.classify(exc, **during).message == "CUDA Out of Memory during video generation", exc
    try:  # what torch's CPU allocator raises, for real
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as exc:
        cpu = errors.classify(exc, **during)
    assert (cpu.error_type, cpu.message) == (errors.OUT_OF_MEMORY, "Out of memory during video generation")
    assert errors.classify(MemoryError()).message == "Out of memory during generation"


def test_other_errors_are_classified_without_a_retry(engine, monkeypatch):
    stand_in = flaky(monkeypatch, WanPipeline, RuntimeError("shape mismatch"), failures=1)
    with pytest.raises(errors.GenerationError) as failure:
        engine.generate(video_request())
    assert failure.value.error_type == errors.RUNTIME_ERROR
    assert "shape mismatch" in failure.value.message
    assert len(stand_in.calls) == 1


# --- models that are not there ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["no-such-org/no-such-model", "/nonexistent/sdxl", "./missing-folder"])
def test_a_model_that_cannot_be_loaded_is_model_not_available(model):
    engine = Engine(EngineConfig(image_model=model, video_model="none", device="cpu", local_files_only=True))
    with pytest.raises(errors.ModelNotAvailable) as failure:
        engine.generate(image_request())
    assert model in failure.value.message and "Traceback" not in failure.value.message
    assert len(failure.value.message) < 300
    assert set(engine.preload()) == {"text2image"}  # reported, not raised; video is off so not tried


def test_a_folder_without_a_pipeline_is_model_not_available(tmp_path):
    engine = Engine(EngineConfig(image_model=str(tmp_path), device="cpu"))
    with pytest.raises(errors.ModelNotAvailable, match="not a diffusers pipeline"):
        engine.pipeline("text2image")


def test_video_model_none_fails_video_jobs_only(tiny_cache):
    config = EngineConfig.from_env({"IMAGE_MODEL": "tiny", "VIDEO_MODEL": "none", "FIREGEN_DEVICE": "cpu"})
    engine = Engine(config)
    with pytest.raises(errors.ModelNotAvailable, match="^Video model not loaded$"):
        engine.generate(video_request())
    assert not engine.loaded("text2video")
    assert len(engine.generate(image_request(num_inference_steps=1)).files) == 1


def test_a_local_folder_loads_and_each_pipeline_loads_once(engine, tiny_cache):
    folder = str(tiny.ensure("sdxl"))
    local = Engine(EngineConfig(image_model=folder, video_model="none", device="cpu"))
    first = local.generate(image_request())
    assert first.timings.load_seconds > 0
    assert local.generate(image_request()).timings.load_seconds < first.timings.load_seconds
    assert local.pipeline("text2image") is local.pipeline("text2image")
    assert first.files[0].data == engine.generate(image_request()).files[0].data  # same weights, same bytes


def test_a_loaded_model_is_handed_out_while_another_model_loads(engine):
    """The day's review: every job waited on the one load lock, so while a failing video model was loaded again
    (minutes for Wan) image jobs on the worker's other slots waited for their loaded SDXL."""
    import threading

    loaded = engine.pipeline("text2image")
    got: list = []
    with engine._load_locks["text2video"]:  # another model's load under way
        fetch = threading.Thread(target=lambda: got.append(engine.pipeline("text2image")), daemon=True)
        fetch.start()
        fetch.join(10)
        assert got == [loaded]


def test_a_model_that_failed_to_load_is_tried_again_while_another_loads(tmp_path):
    """The worker loads Wan in the background once SDXL is loaded (`preload_later`): an image job whose model
    failed to load tries again at once, not after the other model's load (minutes for Wan)."""
    missing = Engine(EngineConfig(image_model=str(tmp_path / "no-such-model"), video_model="tiny", device="cpu"))
    failed: list = []

    def fetch():
        try:
            missing.pipeline("text2image")
        except errors.ModelNotAvailable as exc:
            failed.append(exc)

    with missing._load_locks["text2video"]:  # the video model's load under way
        trying = threading.Thread(target=fetch, daemon=True)
        trying.start()
        trying.join(10)
        assert len(failed) == 1 and "no-such-model" in str(failed[0])


def test_engine_config_from_env():
    config = EngineConfig.from_env(
        {
            "IMAGE_MODEL": " /models/sdxl ",
            "VIDEO_MODEL": "",
            "FIREGEN_PRELOAD": "true",
            "HF_HUB_OFFLINE": "1",
            "FIREGEN_DEVICE": "cuda:1",
            "FIREGEN_DTYPE": "float16",
        },
        video_model="tiny",
    )
    assert config == EngineConfig(
        image_model="/models/sdxl",
        video_model="tiny",
        device="cuda:1",
        dtype="float16",
        preload=True,
        local_files_only=True,
        compile_cache=default_cache_dir({}),
    )
    assert EngineConfig.from_env({}).video_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert EngineConfig.from_env({}).offload_text_encoder is None  # auto: decided by the card's memory
    assert EngineConfig.from_env({"FIREGEN_OFFLOAD_TEXT_ENCODER": "on"}).offload_text_encoder is True
    assert EngineConfig.from_env({"FIREGEN_OFFLOAD_TEXT_ENCODER": "0"}).offload_text_encoder is False
    with pytest.raises(
        ValueError, match="^FIREGEN_OFFLOAD_TEXT_ENCODER must be one of auto, on, off \\(or 1/0, true/false, yes/no\\)$"
    ):
        EngineConfig.from_env({"FIREGEN_OFFLOAD_TEXT_ENCODER": "maybe"})
    # Off CUDA there is nothing to offload to: the flag is dropped.
    assert Runtime.detect("cpu", offload=True).offload_text_encoder is False


def test_cpu_runtime_is_float32(engine):
    assert (engine.runtime.device, engine.runtime.dtype) == ("cpu", "float32")
    assert engine.pipeline("text2image").pipe.unet.dtype == torch.float32


# --- tiny pipelines ---------------------------------------------------------------------------------------


def test_tiny_builds_are_deterministic_cached_and_rebuilt_when_stale(tmp_path):
    first, second = tiny.ensure("wan", tmp_path / "a"), tiny.ensure("wan", tmp_path / "b")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    stamp = first / tiny.STAMP
    built_at = stamp.stat().st_mtime_ns
    assert tiny.ensure("wan", tmp_path / "a") == first and stamp.stat().st_mtime_ns == built_at
    stamp.write_text(json.dumps({"kind": "wan", "version": -1}))
    assert tiny.ensure("wan", tmp_path / "a") == first and json.loads(stamp.read_text())["version"] == tiny.VERSION
    assert sorted(p.name for p in (tmp_path / "a" / "tiny").iterdir()) == ["wan"]  # no temp folders left


def test_tiny_models_keep_the_real_downsampling_factors(engine):
    sdxl, wan = engine.pipeline("text2image").pipe, engine.pipeline("text2video").pipe
    assert sdxl.vae_scale_factor == 8 and len(sdxl.vae.config.block_out_channels) == 4
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert (wan.vae_scale_factor_spatial, wan.vae_scale_factor_temporal) == (8, 4)


# --- the command line -------------------------------------------------------------------------------------


def test_cli_writes_images_and_prints_paths_and_seed(tiny_cache, tmp_path, capsys):
    args = [
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
        "--width",
        "256",
        "--height",
        "256",
        "--num-images",
        "2",
        "--steps",
        "10",
        "--seed",
        "5",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [str(tmp_path / "generation.png"), str(tmp_path / "generation_1.png"), "seed 5"]
    load, generate, encode = map(
        float, re.fullmatch(r"seconds: load (.+), generate (.+), encode (.+)\n", printed.err).groups()
    )
    assert load > 0 and generate > 0 and encode > 0  # a fresh engine: the tiny model loaded for this job
    assert Image.open(tmp_path / "generation_1.png").size == (256, 256)


def test_cli_writes_a_video(tiny_cache, tmp_path, capsys):
    args = [
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
        "--video",
        "--video-width",
        "256",
        "--video-height",
        "256",
        "--steps",
        "10",
        "--name",
        "clip",
    ]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "clip.mp4")
    assert media.probe_mp4((tmp_path / "clip.mp4").read_bytes()).frames == 16


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--width", "100"], "width must be between 256 and 1024"),
        (["--fps", "30"], "fps must be between 6 and 15"),
        (["--video-width", "261"], "Validation failed: video_width must be a multiple of 2 for H.264 video (got 261)"),
        (["--width", "wide"], "Validation failed: width must be an integer"),
        (["--steps", "12.5"], "Validation failed: num_inference_steps must be an integer"),
    ],
)
def test_cli_bad_input_prints_the_contract_message_and_exits_2(tmp_path, capsys, flags, message):
    assert cli.main(["--prompt", PROMPT, "--out", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not any(tmp_path.iterdir())


def test_cli_bad_setting_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FIREGEN_OFFLOAD_TEXT_ENCODER", "sometimes")
    assert cli.main(["--prompt", PROMPT, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "configuration error: FIREGEN_OFFLOAD_TEXT_ENCODER must be one of auto, on, off (or 1/0, true/false, yes/no)\n"
    )


def test_cli_generation_failure_prints_the_error_type_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGE_MODEL", "/nonexistent/sdxl")
    assert cli.main(["--prompt", PROMPT, "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "ModelNotAvailable: Image model folder /nonexistent/sdxl not found or not a diffusers pipeline"
    ]


def test_a_model_loaded_later_is_loading_until_its_load_ends_then_its_end_is_said(tiny_cache):
    """`preload_later`: the worker's second model, loaded once the worker claims (its jobs are left queued while
    `loading` says so)."""
    later = Engine(EngineConfig(image_model="none", video_model="tiny", device="cpu"))
    ended = threading.Event()
    failures: list = []
    with later._load_locks["text2video"]:  # its load held at its start
        later.preload_later(["text2video", "text2image"], lambda failed: (failures.append(failed), ended.set()))
        assert later.loading("text2video") and not later.loading("text2image")  # image: `none`, never loaded
        assert not ended.is_set()
    assert ended.wait(120)
    assert failures == [{}] and not later.loading("text2video") and later.loaded("text2video")


def test_a_model_loaded_later_that_fails_says_so_and_is_loading_no_more(tmp_path):
    later = Engine(EngineConfig(image_model="none", video_model=str(tmp_path / "no-such-model"), device="cpu"))
    ended = threading.Event()
    failures: list = []
    later.preload_later(["text2video"], lambda failed: (failures.append(failed), ended.set()))
    assert ended.wait(60)
    [failed] = failures
    assert list(failed) == ["text2video"] and isinstance(failed["text2video"], errors.ModelNotAvailable)
    assert not later.loading("text2video") and not later.loaded("text2video")
