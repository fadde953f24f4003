"""Compiling in the background with a persistent cache (generation.compiling), on the CPU.

Inductor on a CPU takes minutes for the tiny UNet, so the swap tests compile with torch.compile's "eager" backend
(dynamo traces the same graph, fullgraph must hold) or a custom backend that blocks or fails. The cache round trip
needs artifacts, which only inductor produces: it compiles a two-layer module with inductor (~50 s here).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from fixtures_generation import engine, image_request, one_thread, tiny_cache, video_request  # noqa: F401

from generation.compiling import CompileCache, default_cache_dir
from generation.engine import Engine, EngineConfig
from generation.pipelines import ImagePipeline, Runtime, VideoPipeline

COMPILE_DEADLINE_S = 120


pytestmark = pytest.mark.usefixtures("one_thread")


def is_compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def test_jobs_run_eagerly_while_the_unet_compiles_and_compiled_after_the_swap(engine, tiny_cache):
    release = threading.Event()

    def slow_backend(graph, example_inputs):
        """A compiler that takes as long as the test wants: readiness must not wait for it."""
        assert release.wait(COMPILE_DEADLINE_S)
        return graph.forward

    pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=slow_backend))  # returns while compiling
    assert pipeline.compiler.state == "compiling" and not is_compiled(pipeline.pipe.unet)
    [during] = pipeline.generate(image_request(), 7)  # served eagerly meanwhile
    release.set()
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "compiled" and is_compiled(pipeline.pipe.unet)
    [after] = pipeline.generate(image_request(), 7)
    [eager] = engine.pipeline("text2image").generate(image_request(), 7)
    # Fused projections add the same products in another order: equal to within rounding.
    for image in (during, after):
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(eager, dtype=int)).max() <= 2


def test_a_failing_compiler_leaves_the_unet_eager(tiny_cache, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    with caplog.at_level(logging.WARNING, logger="generation.compiling"):
        pipeline = ImagePipeline.load("tiny", Runtime(compile_backend=broken_backend))
        assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "failed" and "no compiler here" in pipeline.compiler.error
    assert "staying eager" in caplog.text
    assert not is_compiled(pipeline.pipe.unet)
    [image] = pipeline.generate(image_request(), 7)
    assert image.size == (64, 64)


def test_the_engine_reports_each_models_compile_state(tiny_cache):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    config = EngineConfig(image_model="tiny", video_model="none", device="cpu")
    engine = Engine(config, runtime=Runtime(compile_backend=broken_backend))
    assert engine.compile_states() == {}  # nothing loaded yet
    pipeline = engine.pipeline("text2image")
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert engine.compile_states() == {"text2image": "failed"}
    assert len(engine.generate(image_request(num_inference_steps=1)).files) == 1  # served eagerly


def test_the_wan_transformer_compiles_in_the_background_and_draws_the_same_video(engine, tiny_cache):
    pipeline = VideoPipeline.load("tiny", Runtime(compile_backend="eager"))
    assert pipeline.compiler.wait(COMPILE_DEADLINE_S)
    assert pipeline.compiler.state == "compiled", pipeline.compiler.error
    assert is_compiled(VideoPipeline.denoiser(pipeline.pipe))  # inside the CFG-batching wrapper
    video = pipeline.generate(video_request(), 5).astype(int)
    eager = engine.pipeline("text2video").generate(video_request(), 5).astype(int)
    assert np.abs(video - eager).max() <= 2


def test_compile_settings_from_the_environment(tmp_path, monkeypatch):
    config = EngineConfig.from_env({"HF_HOME": str(tmp_path)})
    assert config.compile is None  # auto: on for CUDA
    if not (tmp_path.parent / "runpod-volume").is_dir():
        assert config.compile_cache in (f"{tmp_path}/firegen-compile", "/runpod-volume/firegen-compile")
    assert config.compile_cache == default_cache_dir({"HF_HOME": str(tmp_path)})
    assert EngineConfig.from_env({"FIREGEN_COMPILE": "off", "FIREGEN_COMPILE_CACHE": "off"}).compile_cache is None
    assert EngineConfig.from_env({"FIREGEN_COMPILE": "on", "FIREGEN_COMPILE_CACHE": "/v/c"}).compile_cache == "/v/c"
    with pytest.raises(ValueError, match="^FIREGEN_COMPILE must be one of auto, on, off$"):
        EngineConfig.from_env({"FIREGEN_COMPILE": "fast"})
    # On a CPU, auto and on both leave the models eager (inductor there costs more than it saves).
    assert Runtime.detect("cpu", compile=None).compile_backend is None
    assert Runtime.detect("cpu", compile=True).compile_backend is None
    engine = Engine(EngineConfig(image_model="none", video_model="none", device="cpu"))
    assert engine.runtime.compile_backend is None and engine.compile_states() == {}


def test_cache_files_that_are_missing_or_foreign_mean_compiling_from_scratch(tmp_path, caplog):
    cache = CompileCache(tmp_path / "absent")
    assert not cache.load()
    assert cache.path.name == f"torch-{torch.__version__}-cpu.bin"
    garbage = CompileCache(tmp_path)
    garbage.path.write_bytes(b"not a torch cache")
    with caplog.at_level(logging.WARNING, logger="generation.compiling"):
        assert not garbage.load()
    assert "compiling from scratch" in caplog.text


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
