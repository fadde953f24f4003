"""Session fixtures for the generation tests: the tiny pipelines are built and loaded once per test session.

`tiny_cache` and `engine` are conftest.py's (one of each per session); import the others by name in a test module
(`from fixtures_generation import one_thread`).
"""

from __future__ import annotations

import pytest

from firegen_core.contract import GenerationRequest
from generation.engine import Engine, EngineConfig

PROMPT = "A sunset over mountains"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared two-core machine OpenMP's spin-waits do harm.
    Import it into a module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches emptied before the test: a worker compiles each model once, but the suite compiles many
    pipelines in one process, and dynamo's limits count every graph of a function across all of them."""
    import torch

    from generation import compiling

    # A compile still running from an earlier test (one that failed before releasing its blocking backend) holds
    # the lock, and resetting dynamo under it would break it: wait for it, then reset.
    assert compiling._COMPILE_LOCK.acquire(timeout=240), "an earlier test's background compile is still running"
    compiling._COMPILE_LOCK.release()
    torch._dynamo.reset()
    yield


@pytest.fixture
def small_warm_up(monkeypatch):
    """One small compile warm-up shape per model, where the warm-up's shapes are not what a test is about: each
    shape is a compile, tens of seconds through dynamo on this CPU (tests/test_compiling.py tests the real ones)."""
    from generation.image import ImagePipeline
    from generation.video import VideoPipeline

    monkeypatch.setattr(ImagePipeline, "WARM_UP_SHAPES", ((64, 64, 1, 7.5),))  # image_request's shape
    monkeypatch.setattr(VideoPipeline, "WARM_UP_SHAPES", ((64, 48, 16, 5.0),))  # video_request's


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A fresh FIREGEN_CACHE for the session, so tests never use (or leave behind) a stale tiny build."""
    folder = tmp_path_factory.mktemp("firegen-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FIREGEN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def engine(tiny_cache) -> Engine:
    """Both tiny pipelines, loaded once on the CPU in float32, run on one thread.

    One thread: the tiny models' ops are too small to gain from a second one, and on a shared two-core machine
    OpenMP's spin-waiting turns a 50 ms job into seconds whenever another process wants a core.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = Engine(EngineConfig(image_model="tiny", video_model="tiny", device="cpu", preload=True))
    assert built.loaded("text2image") and built.loaded("text2video")
    yield built
    torch.set_num_threads(threads)


def image_request(**fields) -> GenerationRequest:
    """A small, quick text2image request (sizes below the contract's minimum are fine for the pipeline)."""
    values = dict(prompt=PROMPT, seed=1234, width=64, height=64, num_inference_steps=3)
    return GenerationRequest(**{**values, **fields})


def video_request(**fields) -> GenerationRequest:
    """A small, quick text2video request."""
    values = dict(
        prompt=PROMPT,
        task_type="text2video",
        seed=1234,
        num_frames=16,
        fps=8,
        video_width=64,
        video_height=48,
        num_inference_steps=3,
    )
    return GenerationRequest(**{**values, **fields})


@pytest.fixture
def float8_anywhere(monkeypatch):
    """torchao's float8 quantization on the CPU. Stand-in: torchao refuses it without an sm_89+ card
    (`_check_hardware_support`); on the CPU it chooses the same scales, makes the same float8 casts and emulates
    the scaled matmul, so only that gate is lifted."""
    from torchao.quantization import quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
