"""The opt-in speed settings on the CPU: FP8 refuses clearly where it can't run, and its quantization (torchao, on
the CPU past its card check) draws what bf16 draws; Wan's attention backend, step
cache (First Block Cache) and pinned text-encoder swap run on the tiny Wan.

Speed is measured only by bench/gpu.py on a GPU; here the code paths run and their outputs are compared.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
from fixtures_generation import (  # noqa: F401
    PROMPT,
    float8_anywhere,
    fresh_dynamo,
    image_request,
    one_thread,
    small_warm_up,
    video_request,
)

from bench import gpu_speed
from bench.gpu_speed import psnr
from firegen_core import errors
from generation import __main__ as cli
from generation import fp8, media, video_speed
from generation.capability import Runtime
from generation.engine import Engine, EngineConfig
from generation.image import ImagePipeline
from generation.video import VideoPipeline

FP8_ON_CPU = "FIREGEN_FP8=on needs a CUDA GPU with float8 support (this worker runs on cpu); unset it"


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


# --- FP8 ----------------------------------------------------------------------------------------------------


def test_fp8_on_a_cpu_is_refused_at_start_up_in_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError) as refused:
        EngineConfig.from_env({"FIREGEN_FP8": "on", "FIREGEN_DEVICE": "cpu"})
    assert str(refused.value) == FP8_ON_CPU
    with pytest.raises(ValueError, match="FIREGEN_FP8=on needs a CUDA GPU"):
        Engine(EngineConfig(image_model="none", video_model="none", device="cpu", fp8=True))
    assert not EngineConfig.from_env({"FIREGEN_FP8": "off"}).fp8 and not EngineConfig.from_env({}).fp8
    for value in ("sometimes", "auto"):  # lossy, so never chosen for the user: "auto" is refused, not read as off
        with pytest.raises(ValueError, match="^FIREGEN_FP8 must be one of on, off \\(or 1/0, true/false, yes/no\\)$"):
            EngineConfig.from_env({"FIREGEN_FP8": value})
    # The CLI: one line, exit 2, nothing generated.
    monkeypatch.setenv("FIREGEN_FP8", "on")
    monkeypatch.setenv("FIREGEN_DEVICE", "cpu")
    assert cli.main(["--prompt", PROMPT, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"configuration error: {FP8_ON_CPU}\n"
    assert not any(tmp_path.iterdir())


def test_with_fp8_off_an_engine_drops_torchaos_import_warnings_and_nothing_else(caplog):
    """transformers and diffusers import torchao while models load, whatever FIREGEN_FP8 says; on a machine without
    its kernels (this CPU) the import warns of them. With FP8 off an engine drops exactly those lines (the worker's
    log: tests/test_worker_api.py); anything else torchao says still shows."""
    Engine(EngineConfig(image_model="none", video_model="none", device="cpu"))
    torchao = logging.getLogger("torchao")
    try:
        with caplog.at_level(logging.WARNING):
            torchao.warning(
                "Failed to load /v/site-packages/torchao/_C_mxfp8.cpython-310.so: Could not load this library"
            )
            logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without Triton")
            pytree = logging.getLogger("torch.utils._pytree")
            pytree.warning(
                "%s is an Enum subclass", type("KernelPreference", (), {"__module__": "torchao.quantization"})
            )
            torchao.warning("Failed to load /v/site-packages/other/_C.so: not torchao's")
            torchao.warning("quantize_ found nothing to quantize")
            pytree.warning("%s is an Enum subclass", type("Other", (), {"__module__": "someone.else"}))
        assert [record.getMessage() for record in caplog.records] == [
            "Failed to load /v/site-packages/other/_C.so: not torchao's",
            "quantize_ found nothing to quantize",
            "<class 'someone.else.Other'> is an Enum subclass",
        ]
    finally:
        for name in fp8._IMPORT_NOISE:  # as the rest of the session had it
            logging.getLogger(name).removeFilter(fp8._not_import_noise)


def test_fp8_on_a_card_without_torchao_or_float8_is_refused(monkeypatch):
    """No GPU here: torch.cuda's capability and name are stood in for, and torchao's absence (it is installed)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert fp8.refusal("cuda") == "FIREGEN_FP8=on needs compute capability 8.9+ (Ada, Hopper); Stand-in GPU is 8.6"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.refusal("cuda") is None
    # Only bfloat16 weights are quantized: in float16 or float32 FP8 did nothing, and nothing said so (an audit).
    assert fp8.refusal("cuda", "bfloat16") is None
    for dtype in ("float16", "float32"):
        assert fp8.refusal("cuda", dtype) == f"FIREGEN_FP8=on needs FIREGEN_DTYPE=bfloat16 (or unset), not {dtype}"
        with pytest.raises(ValueError, match=f"not {dtype}$"):
            EngineConfig.from_env({"FIREGEN_FP8": "on", "FIREGEN_DTYPE": dtype, "FIREGEN_DEVICE": "cuda"})
    assert EngineConfig.from_env({"FIREGEN_FP8": "on", "FIREGEN_DEVICE": "cuda"}).fp8
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    assert fp8.refusal("cuda") == (
        "FIREGEN_FP8=on needs torchao (pip install 'firegen-worker[fp8]'), which is not installed"
    )


def test_fp8_keeps_an_all_zero_activation_row_zero(float8_anywhere):
    layer = torch.nn.Linear(32, 32).to(torch.bfloat16)
    fp8.quantize(layer)
    assert type(layer.weight).__name__ == "Float8Tensor"
    rows = torch.zeros(3, 32, dtype=torch.bfloat16)
    rows[1] = torch.linspace(-2, 2, 32)
    out = layer(rows)
    # Without a floor under the row's maximum its scale is 0, and 0/0 made the row (then the image) NaN.
    assert not out.isnan().any()
    assert torch.equal(out[0], layer.bias) and torch.equal(out[2], layer.bias)


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_fp8_sdxl_draws_what_bf16_draws(tiny_cache, float8_anywhere, negative_prompt):
    """The product's load path with FP8 (ImagePipeline.load quantizes the UNet's aligned linear layers) on the
    tiny SDXL in bf16, against bf16. An empty negative prompt gives SDXL all-zero unconditional embeddings."""
    request = image_request(width=128, height=128, num_inference_steps=6, negative_prompt=negative_prompt)
    plain = ImagePipeline.load("tiny", Runtime(device="cpu", dtype="bfloat16"))
    quantized = ImagePipeline.load("tiny", Runtime(device="cpu", dtype="bfloat16", fp8=True))
    layers = [m for m in quantized.pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(type(m.weight).__name__ == "Float8Tensor" for m in layers) > len(layers) // 2
    [reference], [image] = plain.generate(request, 7), quantized.generate(request, 7)
    quality = psnr(np.asarray(image), np.asarray(reference))
    print(f"FP8 vs bf16, tiny SDXL 128x128, 6 steps, negative prompt {negative_prompt!r}: PSNR {quality:.1f} dB")
    assert quality > 30


def test_fp8_with_the_background_compile(tiny_cache, float8_anywhere, small_warm_up):
    """FP8 with the compile that is on by default on CUDA. SDXL's compile recipe fuses the QKV projections, copying
    weights into new layers: made after quantizing, the float8 weights refused the copy and the image model failed
    to load. `aot_eager` traces the float8 tensors through AOTAutograd as inductor's path does, in seconds."""
    request = image_request(width=256, height=256, num_inference_steps=2)  # the warm-up's: no second compile
    pipeline = ImagePipeline.load(
        "tiny", Runtime(device="cpu", dtype="bfloat16", fp8=True, compile_backend="aot_eager")
    )
    unet = ImagePipeline.denoiser(pipeline.pipe)
    assert type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_qkv.weight).__name__ == "Float8Tensor"
    assert pipeline.compiler.wait(300) and pipeline.compiler.state == "compiled", pipeline.compiler.error
    [compiled] = pipeline.generate(request, 7)
    eager = ImagePipeline.load("tiny", Runtime(device="cpu", dtype="bfloat16", fp8=True))
    unet = ImagePipeline.denoiser(eager.pipe)
    assert type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight).__name__ == "Float8Tensor"
    [reference] = eager.generate(request, 7)
    # Fused and separate projections quantize the same rows with the same scales: the same image, within rounding.
    assert np.abs(np.asarray(compiled, dtype=int) - np.asarray(reference, dtype=int)).max() <= 2


@pytest.fixture(scope="module")
def aligned_tiny_wan(tmp_path_factory) -> str:
    """The tiny Wan with a transformer whose widths are multiples of 16 (the tiny one's 12 are too narrow for
    float8 matmuls, so FP8 would leave every layer alone), saved as a folder for the real `from_pretrained`."""
    from diffusers import WanTransformer3DModel

    from generation import tiny

    folder = tmp_path_factory.mktemp("aligned-wan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = tiny.build_wan()
        transformer = WanTransformer3DModel(
            **{**dict(pipe.transformer.config), "attention_head_dim": 16},
        )
    pipe.register_modules(transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_fp8_wan_loads_and_draws_what_bf16_draws(aligned_tiny_wan, float8_anywhere, negative_prompt):
    """Wan keeps its time embedder in float32 (`_keep_in_fp32_modules`); torchao's row-wise float8 takes bf16 weights
    only, and quantizing those layers failed the whole load (ModelNotAvailable). They stay float32 now."""
    request = video_request(video_width=64, video_height=64, num_inference_steps=4, negative_prompt=negative_prompt)
    plain = VideoPipeline.load(aligned_tiny_wan, Runtime(device="cpu", dtype="bfloat16"))
    quantized = VideoPipeline.load(aligned_tiny_wan, Runtime(device="cpu", dtype="bfloat16", fp8=True))
    layers = dict(VideoPipeline.denoiser(quantized.pipe).named_modules())
    kinds = {name: type(m.weight).__name__ for name, m in layers.items() if isinstance(m, torch.nn.Linear)}
    kept = {name for name, kind in kinds.items() if kind != "Float8Tensor"}
    assert kept == {"condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2"}
    assert all(layers[name].weight.dtype == torch.float32 for name in kept) and len(kinds) - len(kept) >= 10
    reference, video = np.asarray(plain.generate(request, 7)), np.asarray(quantized.generate(request, 7))
    quality = psnr(video, reference)
    print(
        f"FP8 vs bf16, tiny Wan (16-wide) 64x64x16, 4 steps, negative prompt {negative_prompt!r}: PSNR {quality:.1f} dB"
    )
    assert quality > 15  # NaN frames give ~4 dB; the random 16-wide model amplifies float8's ~3% per layer


def test_fp8_wan_with_the_background_compile(aligned_tiny_wan, float8_anywhere, small_warm_up):
    request = video_request(num_inference_steps=2)  # the warm-up's size: no second compile
    pipeline = VideoPipeline.load(
        aligned_tiny_wan, Runtime(device="cpu", dtype="bfloat16", fp8=True, compile_backend="aot_eager")
    )
    assert pipeline.compiler.wait(300) and pipeline.compiler.state == "compiled", pipeline.compiler.error
    eager = VideoPipeline.load(aligned_tiny_wan, Runtime(device="cpu", dtype="bfloat16", fp8=True))
    assert np.array_equal(np.asarray(pipeline.generate(request, 7)), np.asarray(eager.generate(request, 7)))


# --- Wan: attention backend, step cache, text-encoder swap --------------------------------------------------


def test_attention_backend_setting():
    assert video_speed.attention_backend("auto", "cpu") == "native"
    assert video_speed.attention_backend("FLEX", "cpu") == "flex"
    with pytest.raises(ValueError, match="^FIREGEN_ATTENTION_BACKEND must be auto or one of .*'fastest'"):
        EngineConfig.from_env({"FIREGEN_ATTENTION_BACKEND": "fastest"})
    assert EngineConfig.from_env({}).attention_backend == "auto"


def test_video_cache_settings():
    assert EngineConfig.from_env({}).video_cache_threshold is None
    assert EngineConfig.from_env({"FIREGEN_VIDEO_CACHE": "firstblock"}).video_cache_threshold == 0.05
    config = EngineConfig.from_env({"FIREGEN_VIDEO_CACHE": "FirstBlock", "FIREGEN_VIDEO_CACHE_THRESHOLD": "0.1"})
    assert config.video_cache_threshold == 0.1
    with pytest.raises(ValueError, match="^FIREGEN_VIDEO_CACHE must be one of off, firstblock"):
        EngineConfig.from_env({"FIREGEN_VIDEO_CACHE": "teacache"})
    for off in ("off", "0", "false", "no", "OFF"):  # the off words of the README's on/off settings
        assert EngineConfig.from_env({"FIREGEN_VIDEO_CACHE": off}).video_cache_threshold is None
    for threshold in ("high", "0", "1", "-0.1"):  # the bounds are no thresholds: 0 never skips, 1 always
        with pytest.raises(ValueError, match="^FIREGEN_VIDEO_CACHE_THRESHOLD must be a number greater than 0 and less"):
            EngineConfig.from_env({"FIREGEN_VIDEO_CACHE": "firstblock", "FIREGEN_VIDEO_CACHE_THRESHOLD": threshold})


def three_block_wan(engine):
    """The tiny Wan has one transformer block and First Block Cache needs a head and a tail block: the same tiny
    architecture with 3 blocks (random weights, fixed seed). The pipeline, and its bare transformer."""
    from diffusers import WanPipeline, WanTransformer3DModel

    tiny_pipe = engine.pipeline("text2video").pipe
    torch.manual_seed(0)
    config = {**video_speed.denoiser(tiny_pipe.transformer).config, "num_layers": 3}
    transformer = WanTransformer3DModel.from_config(config).eval()
    pipe = WanPipeline(**{**tiny_pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe, transformer


def test_first_block_cache_runs_and_its_psnr_against_the_full_run_is_measured(engine, capsys):
    """The 3-block tiny Wan runs fully, then with the cache."""
    pipe, transformer = three_block_wan(engine)
    request = video_request(num_inference_steps=8)
    full = VideoPipeline(pipe, Runtime(), "tiny-3-blocks").generate(request, 5)

    runtime = Runtime(video_cache_threshold=0.5)
    VideoPipeline.place(pipe, runtime)  # the product's placement: attention backend, then the cache hooks
    assert transformer.is_cache_enabled
    decisions = gpu_speed.CacheDecisions(transformer)
    cached = VideoPipeline(pipe, runtime, "tiny-3-blocks").generate(request, 5)
    assert cached.shape == full.shape
    value = psnr(cached, full)
    with capsys.disabled():
        print(
            f"\nFirst Block Cache (threshold 0.5, 8 steps, tiny Wan, 3 blocks): PSNR {value:.1f} dB vs the full run,"
            f" {decisions.reused} of 8 steps reused"
        )
    assert value > 10  # the same video, with some steps' tail blocks reused
    assert decisions.computed + decisions.reused == 8 and 0 < decisions.reused < 8  # the first step always runs


def test_each_video_starts_with_an_empty_step_cache(engine):
    """An audit: the cache kept the last video's step outputs (diffusers resets it at a call's end on components
    that say how, which the CFG wrapper did not): the next video of another size failed "The size of tensor a
    (120) must match the size of tensor b (60)" (every one, until one of the first size), one of the same size
    reused the last one's blocks, and a video stopped mid-way never reaches that end."""
    pipe, _ = three_block_wan(engine)
    runtime = Runtime(video_cache_threshold=0.5)
    VideoPipeline.place(pipe, runtime)
    video = VideoPipeline(pipe, runtime, "tiny-3-blocks")
    request = video_request(num_inference_steps=8)
    first = video.generate(request, 5)
    assert video.generate(video_request(num_inference_steps=8, video_width=96, video_height=64), 5).shape[1:3] == (
        64,
        96,
    )

    def stop_half_way(fraction: float) -> None:
        if fraction >= 0.5:
            raise errors.Interrupted()

    with pytest.raises(errors.Interrupted):
        video.generate(request, 5, stop_half_way)
    assert np.array_equal(video.generate(request, 5), first)


def test_the_step_cache_on_a_one_block_transformer_is_left_out_saying_so(tiny_cache, caplog):
    """An audit: FIREGEN_VIDEO_CACHE=firstblock with the tiny Wan (one block, `make dev`'s) failed the video
    model's load, "Video model tiny is not available: pop from empty list": no video at all."""
    settings = {
        "IMAGE_MODEL": "none",
        "VIDEO_MODEL": "tiny",
        "FIREGEN_DEVICE": "cpu",
        "FIREGEN_VIDEO_CACHE": "firstblock",
    }
    with caplog.at_level(logging.WARNING, logger="generation.video_speed"):
        result = Engine(EngineConfig.from_env(settings)).generate(video_request())
    [said] = [record for record in caplog.records if record.msg == "video_cache_skipped"]
    assert said.reason == "the transformer has 1 block; First Block Cache needs 2 or more"
    assert media.probe_mp4(result.files[0].data).frames == 16


def test_with_the_step_cache_on_the_wan_transformer_is_not_compiled(engine, tmp_path, caplog):
    """Under torch.compile, First Block Cache's per-step decisions differed from eager's (3-block tiny Wan,
    threshold 0.5: 18.2 dB against the full run, eager 21.7 dB): with the cache on, the compile is left out."""
    from diffusers import WanPipeline, WanTransformer3DModel

    tiny_pipe = engine.pipeline("text2video").pipe
    torch.manual_seed(0)
    transformer = WanTransformer3DModel.from_config({**tiny_pipe.transformer.config, "num_layers": 3})
    WanPipeline(**{**tiny_pipe.components, "transformer": transformer}).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="generation.video"):
        pipeline = VideoPipeline.load(str(tmp_path), Runtime(compile_backend="aot_eager", video_cache_threshold=0.5))
    [said] = [record for record in caplog.records if record.msg == "compile_skipped"]
    assert pipeline.compiler is None and (said.model, said.reason) == ("video", "video step cache on")
    eager = VideoPipeline.load(str(tmp_path), Runtime(video_cache_threshold=0.5))
    request = video_request(num_inference_steps=8)
    assert np.array_equal(pipeline.generate(request, 5), eager.generate(request, 5))


def test_the_pinned_swap_copies_the_text_encoder_in_once_per_video_and_gives_the_same_video(engine, tiny_cache):
    """On CUDA the CPU copies are pinned and the copies non-blocking; here the same swap runs CPU to CPU."""
    swapped = VideoPipeline.load("tiny", Runtime())
    swap = video_speed.swap_text_encoder(swapped.pipe, "cpu")
    host = [tensor.data_ptr() for tensor in swap.host]
    video = swapped.generate(video_request(), 5)
    assert swap.swaps == 1  # prompt and negative prompt share one copy
    assert not swap.on_device and [t.data_ptr() for t in swap.tensors] == host  # back on the CPU copies
    assert np.array_equal(video, engine.pipeline("text2video").generate(video_request(), 5))
    swapped.generate(video_request(), 5)
    assert swap.swaps == 2


def test_wan_runs_each_steps_two_passes_as_one_batch_and_draws_the_same_video(engine):
    """VideoPipeline.place wraps Wan's transformer (video_speed.CfgBatched): one batch of 2 per step instead of
    a pass for the prompt and one for the negative prompt. Each step's two predictions equal the two passes' within
    float32 rounding (1e-5; measured 1.2e-6). The videos then agree but at a few spots: the tiny random VAE turns
    such a difference into up to 73 levels at 336 of 147,456 values (measured on an AMD EPYC, none on the CI's
    machines so far), so the video is held to 99% of its values within 2 levels."""
    from diffusers import WanPipeline

    batched = engine.pipeline("text2video")
    assert video_speed.is_cfg_batched(batched.pipe.transformer)
    inner = video_speed.denoiser(batched.pipe.transformer)
    batches, predictions = [], []
    hooks = [
        inner.register_forward_pre_hook(
            lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        ),
        inner.register_forward_hook(lambda module, args, output: predictions.append(output[0].detach().clone())),
    ]
    try:
        request = video_request(num_inference_steps=3)
        video = batched.generate(request, 5).astype(int)
        assert batches == [2, 2, 2]  # one call a step, on both halves
        two_pass = WanPipeline(**{**batched.pipe.components, "transformer": inner})
        two_pass.set_progress_bar_config(disable=True)
        alone = VideoPipeline(two_pass, Runtime(), "tiny").generate(request, 5).astype(int)
    finally:
        for hook in hooks:
            hook.remove()
    assert batches == [2, 2, 2, 1, 1, 1, 1, 1, 1]
    one_batch, passes = predictions[:3], predictions[3:]
    for step, both in enumerate(one_batch):
        conditional, unconditional = both.chunk(2)
        assert torch.allclose(conditional, passes[2 * step], rtol=0, atol=1e-5), step
        assert torch.allclose(unconditional, passes[2 * step + 1], rtol=0, atol=1e-5), step
    off = np.abs(video - alone)
    assert (off > 2).mean() < 0.01, (off.max(), (off > 2).sum())
    # Guidance 1 (no negative pass): nothing to batch.
    batches = []
    hook = inner.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        batched.generate(video_request(num_inference_steps=2, video_guidance_scale=1.0), 5)
    finally:
        hook.remove()
    assert batches == [1, 1]


@pytest.mark.parametrize(
    "gib,bf16,offload,dtype",
    [(24, True, True, "bfloat16"), (80, True, False, "bfloat16"), (16, False, True, "float16")],
)
def test_the_cuda_defaults_follow_the_card(monkeypatch, gib, bf16, offload, dtype):
    """README: FIREGEN_OFFLOAD_TEXT_ENCODER `auto` is on for a CUDA card under 40 GiB; FIREGEN_DTYPE defaults to
    bf16 on CUDA, fp16 on a card without bf16, and FIREGEN_COMPILE `auto` is on. This machine has no CUDA card:
    torch's answers about one are stood in for (the only mock here), the decisions are the product's own."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    runtime = Runtime.detect(compile=None)
    assert (runtime.device, runtime.dtype, runtime.offload_text_encoder) == ("cuda", dtype, offload)
    assert runtime.compile_backend == "inductor"
    cpu = Runtime.detect(device="cpu", compile=None)  # and on a CPU: fp32, no offload, eager
    assert (cpu.dtype, cpu.offload_text_encoder, cpu.compile_backend) == ("float32", False, None)
