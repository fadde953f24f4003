"""Batching on the tiny SDXL: compatible text2image jobs share one pipeline call (one UNet batch), and each job
gets what it would have got alone.

Tolerance: a batched job's pixels are within 2 levels (of 255) of its unbatched pixels. The text encoders run
per prompt exactly as unbatched; only the UNet and VAE see a bigger batch, where the CPU's matrix kernels may
add the same products in another order (float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from fixtures_generation import image_request, video_request
from test_generation import OOM_ERRORS, flaky, pixels

from firegen_core import errors
from generation.engine import batch_key

TOLERANCE = 2  # pixel levels, see the module docstring


def assert_same_images(batched, alone) -> None:
    assert batched.seed == alone.seed and len(batched.files) == len(alone.files)
    for mine, theirs in zip(batched.files, alone.files):
        assert np.abs(pixels(mine.data) - pixels(theirs.data)).max() <= TOLERANCE


MIXED = [
    image_request(prompt="A red fox in snow", seed=1),
    image_request(prompt="A lighthouse at night", seed=2, negative_prompt="blurry"),
    image_request(prompt="A bowl of fruit", seed=3, num_images_per_prompt=2),
]


def test_batch_key_groups_by_size_steps_and_guidance_only():
    base = batch_key(image_request())
    assert base is not None
    for same in (dict(prompt="other"), dict(seed=9), dict(negative_prompt="x"), dict(num_images_per_prompt=3)):
        assert batch_key(image_request(**same)) == base, same
    for other in (dict(width=128), dict(height=128), dict(num_inference_steps=4), dict(guidance_scale=3.0)):
        assert batch_key(image_request(**other)) != base, other
    assert batch_key(video_request()) is None


def test_batched_jobs_equal_their_unbatched_runs_per_seed(engine):
    calls = []
    original = StableDiffusionXLPipeline.__call__

    def counting(pipe, **kwargs):
        calls.append(len(kwargs["generator"]))
        return original(pipe, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionXLPipeline, "__call__", counting)
        batched = engine.generate_batch(MIXED)
    assert calls == [4]  # one pipeline call: 1 + 1 + 2 images in one UNet batch
    for result, request in zip(batched, MIXED):
        assert_same_images(result, engine.generate(request))
    # Seeds still tell images apart inside a batch.
    assert np.abs(pixels(batched[0].files[0].data) - pixels(batched[1].files[0].data)).max() > TOLERANCE


def test_each_job_has_its_own_progress_and_one_cancelled_job_leaves_the_others(engine, monkeypatch):
    seen: list[list[float]] = [[], [], []]
    vae = engine.pipeline("text2image").pipe.vae
    decode, decoded = vae.decode, []
    monkeypatch.setattr(vae, "decode", lambda latents, **kw: decoded.append(len(latents)) or decode(latents, **kw))

    def cancel_at_half(fraction):
        seen[1].append(fraction)
        if fraction >= 0.5:
            raise errors.Interrupted()

    requests = [image_request(seed=s, num_inference_steps=4) for s in (1, 2, 3)]
    results = engine.generate_batch(requests, progress=[seen[0].append, cancel_at_half, seen[2].append])
    assert seen[0] == seen[2] == [0.25, 0.5, 0.75, 1.0]
    assert seen[1] == [0.25, 0.5]  # not called again once it cancelled
    assert isinstance(results[1], errors.Interrupted)
    assert decoded == [2]  # the cancelled job's image is not decoded
    assert_same_images(results[0], engine.generate(requests[0]))
    assert_same_images(results[2], engine.generate(requests[2]))


def test_a_batch_whose_jobs_are_all_cancelled_stops_at_once(engine):
    steps = []

    def cancel(fraction):
        steps.append(fraction)
        raise errors.Interrupted()

    results = engine.generate_batch([image_request(seed=1), image_request(seed=2)], progress=[cancel, cancel])
    assert all(isinstance(result, errors.Interrupted) for result in results)
    assert steps == [1 / 3, 1 / 3]  # both saw the first step; no second step ran


def test_a_stopped_calls_tensors_go_when_it_returns_not_at_a_garbage_collection(engine, monkeypatch):
    """An audit: the caught Interrupted, kept per job, held through its traceback the step's frame and so the
    stopped call's latents and embeddings (a reference cycle), out of reach of the out-of-memory retry's freeing."""
    import gc
    import weakref

    from generation.image import _BatchProgress

    latents: list[weakref.ref] = []
    on_step_end = _BatchProgress.on_step_end

    def watched(self, pipe, step, timestep, callback_kwargs):
        latents.append(weakref.ref(callback_kwargs["latents"]))
        return on_step_end(self, pipe, step, timestep, callback_kwargs)

    def cancel(fraction):
        raise errors.Interrupted()

    monkeypatch.setattr(_BatchProgress, "on_step_end", watched)
    gc.collect()
    gc.disable()
    try:
        for progress in ([cancel, cancel], [cancel, None]):  # the whole batch stopped; one job of two
            latents.clear()
            results = engine.generate_batch([image_request(seed=1), image_request(seed=2)], progress=progress)
            assert isinstance(results[0], errors.Interrupted)
            del results
            assert latents and all(ref() is None for ref in latents)
    finally:
        gc.enable()


def test_out_of_memory_in_a_batch_retries_image_by_image(engine, monkeypatch):
    stand_in = flaky(monkeypatch, StableDiffusionXLPipeline, OOM_ERRORS[0], failures=1)
    results = engine.generate_batch(MIXED)
    assert [call["images"] for call in stand_in.calls] == [4, 1, 1, 1, 1]
    monkeypatch.undo()
    for result, request in zip(results, MIXED):
        assert_same_images(result, engine.generate(request))


def test_a_failed_batch_fails_every_job_and_mixed_keys_are_refused(engine, monkeypatch):
    flaky(monkeypatch, StableDiffusionXLPipeline, RuntimeError("shape mismatch"), failures=1)
    results = engine.generate_batch(MIXED[:2])
    assert [r.error_type for r in results] == [errors.RUNTIME_ERROR] * 2
    with pytest.raises(ValueError, match="cannot share a batch"):
        engine.generate_batch([image_request(), image_request(width=128)])
