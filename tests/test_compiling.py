"""Compiling in the background with a persistent cache (generation.compiling), on the CPU.

Inductor on a CPU takes minutes for the tiny UNet, so the swap tests compile with torch.compile's "eager" backend
(dynamo traces the same graph, fullgraph must hold) or a custom backend that blocks or fails. The cache round trip
needs artifacts, which only inductor produces: it compiles a two-layer module with inductor, into scalar C++
(`scalar_inductor`).
"""

from __future__ import annotations

import logging
import threading

import diffusers
import numpy as np
import pytest
import torch
from fixtures_generation import (  # noqa: F401
    fresh_dynamo,
    image_request,
    one_thread,
    small_warm_up,
    video_request,
)

from generation.capability import Runtime
from generation.compiling import CompileCache, default_cache_dir, model_tag, sibling_pipeline
from generation.engine import Engine, EngineConfig
from generation.image import BatchItem, ImagePipeline
from generation.video import VideoPipeline

# A bound, not a sleep: a CPU compile takes 10-40 s alone, and past 120 s on a 2-core machine with other work on it.
COMPILE_DEADLINE_S = 300


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and the calls of them, and runs them as traced.
    `fail_on`: the graphs (1 = the first) whose compile fails."""

    def __init__(self, fail_on: tuple[int, ...] = ()):
        self.graphs = self.runs = 0
        self.fail_on = fail_on

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        if self.graphs in self.fail_on:
            raise RuntimeError(f"no compiler for graph {self.graphs}")

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


def is_compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def max_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def test_jobs_run_eagerly_while_the_unet_compiles_and_compiled_after_the_swap(engine, tiny_cache, small_warm_up):
    release = threading.Event()
    compiled = CountingBackend()

    def slow_backend(graph, example_inputs):
        """A compiler that takes as long as the test wants: readiness must not wait for it."""
        assert release.wait(COMPILE_DEADLINE_S)
        return compiled(graph, example_inputs)

    pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=slow_backend))  # returns while compiling
    assert pipeline.compiler.state == "compiling" and not is_compiled(pipeline.pipe.unet)
    [during] = pipeline.generate(image_request(), 7)  # served eagerly meanwhile
    release.set()
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "compiled" and is_compiled(pipeline.pipe.unet)
    warmed_up = compiled.runs
    [after] = pipeline.generate(image_request(), 7)
    assert compiled.runs == warmed_up + 3  # each of the job's 3 steps ran the compiled graph
    [eager] = engine.pipeline("text2image").generate(image_request(), 7)
    # Fused projections add the same products in another order: equal to within rounding.
    assert max_difference(during, eager) <= 2 and max_difference(after, eager) <= 2


def test_the_warm_ups_prompt_encoding_beside_a_jobs_mixes_neither(tiny_cache):
    """The warm-up encodes its prompt on the sibling pipeline while a job encodes its own: on one shared fast
    tokenizer the two calls' padding mixed ("Sizes of tensors must match": the job failed, or the warm-up did and
    the worker stayed eager; seen in a parallel test run). The GIL is handed over every microsecond so that the
    threads interleave within the tokenizer's calls: on the shared tokenizer ~7 of 500 encodings failed."""
    import sys

    pipe = ImagePipeline.load("tiny", Runtime()).pipe
    sibling = sibling_pipeline(pipe)
    assert sibling.unet is pipe.unet and sibling.text_encoder_2 is pipe.text_encoder_2  # the weights, once
    assert sibling.tokenizer is not pipe.tokenizer and sibling.tokenizer_2 is not pipe.tokenizer_2
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    failures: list[str] = []

    def encode(on, prompt: str) -> None:
        for _ in range(800):
            try:
                on.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    try:
        threads = [
            threading.Thread(target=encode, args=(pipe, "a lighthouse at dusk over the sea"), daemon=True),
            threading.Thread(target=encode, args=(sibling, "warm-up"), daemon=True),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def test_a_failing_compiler_leaves_the_unet_eager(tiny_cache, caplog, small_warm_up):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    with caplog.at_level(logging.WARNING, logger="generation.compiling"):
        pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=broken_backend))
        assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "failed" and "no compiler here" in pipeline.compiler.error
    [said] = [record for record in caplog.records if record.msg == "compile_failed"]
    assert (said.model, said.action) == ("image", "stay eager") and "no compiler here" in said.error
    assert not is_compiled(pipeline.pipe.unet)
    [image] = pipeline.generate(image_request(), 7)
    assert image.size == (64, 64)


def test_the_warm_up_compiles_what_jobs_of_other_sizes_image_counts_and_batches_run(tiny_cache):
    """Jobs never compile (a recompile on a job's own time takes a minute or more on a GPU, under the pipeline's
    lock); the warm-up's shapes leave them compiled graphs for every size that is a multiple of 8 (no multiple of
    32 in height, or in width), any image count, batches of jobs, and sizes that are multiples of 32 without CFG."""
    compiles = CountingBackend()
    pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=compiles))
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S) and pipeline.compiler.state == "compiled"
    assert compiles.graphs == len(ImagePipeline.WARM_UP_SHAPES)  # each shape is a graph of its own
    assert pipeline.compiler.shapes == list(ImagePipeline.WARM_UP_SHAPES)
    jobs = [(256, 256, 1, 7.5), (384, 640, 3, 7.5), (264, 256, 1, 7.5), (256, 600, 2, 7.5), (320, 256, 2, 1.0)]
    for width, height, images, guidance in jobs:
        runs = compiles.runs
        request = image_request(
            width=width, height=height, num_images_per_prompt=images, num_inference_steps=2, guidance_scale=guidance
        )
        pipeline.generate(request, 1)
        assert compiles.runs == runs + 2, (width, height, images, guidance)  # both steps compiled
    runs = compiles.runs
    pipeline.generate_batch(
        [BatchItem(image_request(width=384, height=384, num_inference_steps=2), s) for s in (1, 2, 3)]
    )
    assert compiles.runs == runs + 2
    assert compiles.graphs == len(ImagePipeline.WARM_UP_SHAPES)


def test_the_wan_warm_up_compiles_what_videos_of_other_sizes_and_lengths_run(tiny_cache):
    compiles = CountingBackend()
    pipeline = VideoPipeline.load("tiny", Runtime(compile_backend=compiles))
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S) and pipeline.compiler.state == "compiled"
    warmed_up = compiles.graphs
    for width, height, frames, guidance in [(256, 256, 16, 5.0), (320, 256, 24, 5.0), (256, 256, 16, 1.0)]:
        runs = compiles.runs
        request = video_request(
            video_width=width, video_height=height, num_frames=frames, video_guidance_scale=guidance
        )
        pipeline.generate(request, 1)
        # The 3 steps, each pass pair one batch; without CFG (a review: it ran eagerly) one pass each.
        assert compiles.runs == runs + 3, (width, height, frames, guidance)
    assert compiles.graphs == warmed_up


def test_a_job_of_a_shape_no_graph_covers_runs_eagerly_without_compiling(engine, tiny_cache, small_warm_up):
    compiles = CountingBackend()
    pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=compiles))
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S) and pipeline.compiler.state == "compiled"
    request = image_request(width=264, height=256)  # a latent width that is no multiple of 4: another branch
    [image] = pipeline.generate(request, 7)
    assert (compiles.graphs, compiles.runs) == (1, 1)  # the warm-up's
    assert pipeline.compiler.state == "compiled" and is_compiled(pipeline.pipe.unet)
    [eager] = engine.pipeline("text2image").generate(request, 7)
    assert max_difference(image, eager) <= 2


def test_a_warm_up_shape_that_fails_to_compile_runs_eagerly_and_the_others_compiled(tiny_cache, caplog, monkeypatch):
    # Shapes that differ in the UNet's batch alone (2 images, or no CFG), not in height and width: each compile is
    # then a trace with static sides, seconds cheaper here. A batch of 4 (the failed shape's) no graph covers: the
    # first graph is static (a batch of 2), the last one a batch of 1 (dynamo never makes a size of 1 dynamic).
    shapes = ((64, 64, 1, 7.5), (64, 64, 2, 7.5), (64, 64, 1, 1.0))
    monkeypatch.setattr(ImagePipeline, "WARM_UP_SHAPES", shapes)
    compiles = CountingBackend(fail_on=(2,))
    with caplog.at_level(logging.WARNING, logger="generation.compiling"):
        pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=compiles))
        assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "compiled" and pipeline.compiler.shapes == [shapes[0], shapes[2]]
    [said] = [record for record in caplog.records if record.msg == "compile_shape_failed"]
    assert (said.shape, said.action) == (
        [64, 64, 2, 7.5],
        "run it eagerly",
    ) and "no compiler for graph 2" in said.error
    for (width, height, images, guidance), compiled_steps in zip(shapes, (2, 0, 2)):
        runs = compiles.runs
        request = image_request(
            width=width, height=height, num_images_per_prompt=images, guidance_scale=guidance, num_inference_steps=2
        )
        generated = pipeline.generate(request, 7)
        assert len(generated) == images and all(image.size == (width, height) for image in generated)
        assert compiles.runs == runs + compiled_steps, (images, guidance)


def test_jobs_run_compiled_shapes_while_later_shapes_compile(tiny_cache, monkeypatch):
    # The second shape differs from the first in the UNet's batch alone: a graph dynamic in the batch, not in
    # height and width too (a trace seconds cheaper here).
    monkeypatch.setattr(ImagePipeline, "WARM_UP_SHAPES", ((64, 64, 1, 7.5), (64, 64, 2, 7.5)))
    compiled = CountingBackend()
    second = threading.Event()
    release = threading.Event()

    def backend(graph, example_inputs):
        if compiled.graphs == 1:  # the second shape's compile waits, as a long one would
            second.set()
            assert release.wait(COMPILE_DEADLINE_S)
        return compiled(graph, example_inputs)

    pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=backend))
    assert second.wait(COMPILE_DEADLINE_S) and pipeline.compiler.state == "compiled"
    runs = compiled.runs
    [image] = pipeline.generate(image_request(num_inference_steps=2), 7)  # the first shape's graph
    assert image.size == (64, 64) and compiled.runs == runs + 2 and not pipeline.compiler.wait(0)
    release.set()
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S) and len(pipeline.compiler.shapes) == 2
    runs = compiled.runs
    pipeline.generate(image_request(num_images_per_prompt=3, num_inference_steps=2), 7)  # the second's, dynamic
    assert compiled.runs == runs + 2


def test_the_engine_reports_each_models_compile_state(tiny_cache, small_warm_up):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    config = EngineConfig(image_model="tiny", video_model="none", device="cpu")
    engine = Engine(config, runtime=Runtime(compile_backend=broken_backend))
    assert engine.compile_states() == {}  # nothing loaded yet
    pipeline = engine.pipeline("text2image")
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert engine.compile_states() == {"text2image": "failed"}
    assert len(engine.generate(image_request(num_inference_steps=1)).files) == 1  # served eagerly


def test_the_wan_transformer_compiles_in_the_background_and_draws_the_same_video(engine, tiny_cache, small_warm_up):
    pipeline = VideoPipeline.load("tiny", Runtime(compile_backend="eager"))
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "compiled", pipeline.compiler.error
    assert is_compiled(VideoPipeline.denoiser(pipeline.pipe))  # inside the CFG-batching wrapper
    assert (
        max_difference(
            pipeline.generate(video_request(), 5), engine.pipeline("text2video").generate(video_request(), 5)
        )
        <= 2
    )


def test_compile_settings_from_the_environment(tmp_path, monkeypatch):
    config = EngineConfig.from_env({"HF_HOME": str(tmp_path)})
    assert config.compile is None  # auto: on for CUDA
    if not (tmp_path.parent / "runpod-volume").is_dir():
        assert config.compile_cache in (f"{tmp_path}/firegen-compile", "/runpod-volume/firegen-compile")
    assert config.compile_cache == default_cache_dir({"HF_HOME": str(tmp_path)})
    assert EngineConfig.from_env({"FIREGEN_COMPILE": "off", "FIREGEN_COMPILE_CACHE": "off"}).compile_cache is None
    assert EngineConfig.from_env({"FIREGEN_COMPILE": "on", "FIREGEN_COMPILE_CACHE": "/v/c"}).compile_cache == "/v/c"
    with pytest.raises(
        ValueError, match="^FIREGEN_COMPILE must be one of auto, on, off \\(or 1/0, true/false, yes/no\\)$"
    ):
        EngineConfig.from_env({"FIREGEN_COMPILE": "fast"})
    # On a CPU, auto and on both leave the models eager (inductor there costs more than it saves).
    assert Runtime.detect("cpu", compile=None).compile_backend is None
    assert Runtime.detect("cpu", compile=True).compile_backend is None
    engine = Engine(EngineConfig(image_model="none", video_model="none", device="cpu"))
    assert engine.runtime.compile_backend is None and engine.compile_states() == {}


def test_a_cache_file_is_per_precision_architecture_and_attention_backend_not_per_weights(engine):
    """An audit: endpoints sharing a volume with another FIREGEN_DTYPE or Wan size loaded each other's
    artifacts, useless, and overwrote the file at every cold start."""
    config = dict(engine.pipeline("text2video").pipe.transformer.config)
    tag = model_tag("video", "bfloat16", False, "native", config)
    assert tag.startswith("video-bfloat16-") and tag == model_tag("video", "bfloat16", False, "native", config)
    fine_tune = {**config, "_name_or_path": "/runpod-volume/hf/another/snapshot", "_diffusers_version": "0.0"}
    assert model_tag("video", "bfloat16", False, "native", fine_tune) == tag  # weights elsewhere: shared
    others = {
        model_tag("video", "float16", False, "native", config),
        model_tag("video", "bfloat16", True, "native", config),
        model_tag("video", "bfloat16", False, "_flash_3", config),
        model_tag("video", "bfloat16", False, "native", {**config, "num_layers": 30}),
        model_tag("image", "bfloat16", False, "native", config),
    }
    assert tag not in others and len(others) == 5
    assert model_tag("video", "bfloat16", True, "native", config).startswith("video-bfloat16-fp8-")


def test_cache_files_that_are_missing_or_foreign_mean_compiling_from_scratch(tmp_path, caplog):
    cache = CompileCache(tmp_path / "absent")
    assert not cache.load()
    assert cache.path.name == f"torch-{torch.__version__}-diffusers-{diffusers.__version__}-cpu-model.bin"
    assert CompileCache(tmp_path, model="video-fp8").path.name.endswith("-cpu-video-fp8.bin")
    garbage = CompileCache(tmp_path)
    garbage.path.write_bytes(b"not a torch cache")
    with caplog.at_level(logging.WARNING, logger="generation.compiling"):
        assert not garbage.load()
    [said] = [record for record in caplog.records if record.msg == "compile_cache_not_loaded"]
    assert (said.path, said.action) == (str(garbage.path), "compile from scratch")


@pytest.fixture
def scalar_inductor():
    """Inductor's CPU kernels without SIMD. Its first CPU compile in a process probes which vector instruction sets
    work by building and loading a C++ program for each (13-24 s here, in the empty inductor cache each of these
    tests starts from); the mega-cache round trip is the same for scalar kernels, and production's are CUDA's.
    The probe's result is cached for the process: cleared after, so a later compile probes as it would have."""
    from torch._inductor import config, cpu_vec_isa

    with config.patch({"cpp.vec_isa_ok": False}):
        yield
    cpu_vec_isa.valid_vec_isa_list.cache_clear()


@pytest.mark.usefixtures("scalar_inductor")
def test_the_compile_cache_round_trip_turns_a_compile_into_cache_hits(tmp_path, monkeypatch):
    """Compile with inductor into one empty local cache, save the portable artifacts, then compile the same
    module with another empty local cache after loading them: inductor's FX graph cache hits."""
    from torch._dynamo.utils import counters

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    inputs = torch.randn(2, 8)
    cache = CompileCache(tmp_path / "volume")

    def compile_once() -> torch.Tensor:
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            return torch.compile(module, backend="inductor")(inputs)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local-1"))
    first = compile_once()
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    assert cache.save() > 0 and cache.path.is_file()

    # A fresh worker: empty local caches, nothing in memory; only the file can help now.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local-2"))
    torch.compiler.reset()
    assert cache.load()
    again = compile_once()
    hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
    assert hits >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0, dict(counters)
    assert torch.equal(first, again)


@pytest.mark.usefixtures("scalar_inductor")
def test_the_cache_file_grows_with_each_shape_and_a_worker_stopped_half_way_never_shrinks_it(tmp_path, monkeypatch):
    """Workers of one endpoint share the file, and a serverless worker may be stopped in the middle of its warm-up.
    Each "worker" here starts fresh (an empty local inductor cache, nothing compiled in memory) and compiles with
    inductor a module per warm-up shape; only the file carries anything from one to the next."""
    shapes = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.nn.Sequential(torch.nn.Tanh())]
    inputs = torch.randn(2, 8)
    path = CompileCache(tmp_path).path

    def worker(name: str, modules, finished: bool) -> list[int]:
        """The bytes each save wrote (0: none), as BackgroundCompile saves: after each shape, then at the end."""
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"local-{name}"))
        torch.compiler.reset()
        cache = CompileCache(tmp_path)
        written = []
        with CompileCache.recording():
            cache.load()
            for module in modules:
                with torch.no_grad():
                    torch.compile(module, backend="inductor")(inputs)
                written.append(cache.save(final=False))
            if finished:
                written.append(cache.save(final=True))
        return written

    [first] = worker("stopped-after-one", shapes[:1], finished=False)
    assert first > 0 and path.stat().st_size == first  # written before the end of the warm-up
    hit, second, end = worker("full", shapes, finished=True)
    assert hit == 0 and second > first and end == 0  # nothing new from the first shape's cache hit, nor at the end
    full = path.read_bytes()
    assert worker("stopped-again", shapes[:1], finished=False) == [0] and path.read_bytes() == full  # not shrunk
    [_, replaced] = worker("another-config", shapes[1:], finished=True)  # e.g. code that traces other graphs
    assert 0 < replaced < len(full) and path.stat().st_size == replaced  # the end of a warm-up writes its whole set
