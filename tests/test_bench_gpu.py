"""The GPU section of the benchmark (bench/gpu.py) without a GPU.

The full-size configs are checked on the meta device (no memory is allocated) against the published parameter
counts; the section's whole code path (build, product placement, every mode, Wan's timed steps, the budget, the
JSON file) runs at the tiny scale on the CPU, with the UNet traced by torch.compile's "eager" backend so a graph
break under fullgraph=True shows here rather than on a rented GPU. CUDA-only parts (inductor, memory statistics)
are what is left out.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures_generation import float8_anywhere, fresh_dynamo, image_request, one_thread, small_warm_up  # noqa: F401

from bench import gpu as bench_gpu_module
from bench import gpu_speed
from bench.gpu import (
    FULL,
    GIB,
    PUBLISHED_PARAMETERS,
    STEPS,
    Gpu,
    bench_gpu,
    build_components,
    compiled_step,
    main,
    parameter_counts,
    summarize,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def quiet(_line: str) -> None:
    pass


def test_full_size_configs_have_the_published_parameter_counts():
    counts = parameter_counts("full")
    assert set(counts) == set(PUBLISHED_PARAMETERS)
    for name, published in PUBLISHED_PARAMETERS.items():
        assert counts[name] == pytest.approx(published, rel=0.01), name
    # The exact figures of the real checkpoints.
    assert counts["sdxl_unet"] == 2_567_463_684
    assert counts["umt5_xxl"] == 5_680_910_336
    assert counts["wan_transformer"] == 1_418_996_800
    # The couplings between the models that the pipelines rely on.
    assert FULL["sdxl_unet"]["cross_attention_dim"] == FULL["clip_l"]["hidden_size"] + FULL["clip_bigg"]["hidden_size"]
    assert FULL["sdxl_unet"]["projection_class_embeddings_input_dim"] == (
        FULL["clip_bigg"]["projection_dim"] + 6 * FULL["sdxl_unet"]["addition_time_embed_dim"]
    )
    assert FULL["wan_transformer"]["text_dim"] == FULL["umt5_xxl"]["d_model"]


def test_built_models_keep_the_modules_from_pretrained_keeps_in_float32(tmp_path):
    """Built in bf16, each parameter has the dtype `from_pretrained(..., dtype=bfloat16)` would give it."""
    built = build_components(list(FULL), "tiny", "cpu", torch.bfloat16)
    for name, model in built.items():
        model.save_pretrained(tmp_path / name)
        loaded = type(model).from_pretrained(tmp_path / name, dtype=torch.bfloat16)
        expected = {key: param.dtype for key, param in loaded.named_parameters()}
        assert {key: param.dtype for key, param in model.named_parameters()} == expected, name
    transformer_dtypes = {p.dtype for p in built["wan_transformer"].parameters()}
    assert transformer_dtypes == {torch.bfloat16, torch.float32}  # the norms and time embedder stay float32


def test_the_whole_section_runs_at_tiny_scale_on_the_cpu(tmp_path, small_warm_up):
    from torch.compiler._cache import CacheArtifactManager

    out = tmp_path / "gpu.json"
    # Artifacts are collected per process: another file's inductor compiles must not count as this run's.
    with CacheArtifactManager.with_fresh_cache():
        figures = bench_gpu("tiny", "cpu", compile_modes=("default",), compile_backend="eager", out=out, log=quiet)

    assert json.loads(out.read_text(), parse_constant=refuse_constant) == figures  # standard JSON: no Infinity
    assert not [key for key in figures if key.startswith(("error_", "skipped_"))], figures
    assert (figures["device"], figures["dtype"]) == ("cpu", "float32")
    for mode in ("baseline", "channels_last", "fused_qkv", "compiled_default"):
        assert figures[f"sdxl_{mode}_s_per_image"] > 0
    assert figures["sdxl_compiled_default_compile_s"] is not None
    assert figures["sdxl_best_mode"] in (
        "baseline",
        "channels_last",
        "fused_qkv",
        "compiled_default",
        "product_compiled",
    )
    assert figures["sdxl_with_wan_s_per_image"] > 0
    # Wan: 2 timed steps; the 50-step figure is encode + 50 steps + decode.
    assert figures["wan_2steps_s"] > 0
    extrapolated = figures["wan_encode_s"] + 50 * figures["wan_step_s"] + figures["wan_decode_s"]
    assert figures["wan_50steps_extrapolated_s"] == pytest.approx(extrapolated, abs=0.15)
    # The speed options (bench/gpu_speed.py).
    assert figures["attention_backend"] == "native"
    assert figures["sdxl_batch1_2steps_images_per_s"] > 0 and figures["sdxl_batch2_2steps_images_per_s"] > 0
    assert figures["compile_cold_s"] > 0 and figures["compile_warm_s"] > 0
    assert figures["sdxl_product_compiled_s_per_image"] > 0  # the job the compiled shape serves (64x64)
    assert figures["compile_cache_mib"] == 0  # the "eager" backend leaves no artifacts (inductor does)
    assert figures["sdxl_fp8_refused"].startswith("FIREGEN_FP8=on needs a CUDA GPU")
    assert figures["wan_cache_speedup"] > 0
    _, _, steps = figures["wan_cache_steps_reused"].split()
    assert steps == "4"  # one decision per step of the tiny run
    # A PSNR figure, or none where the videos are equal. Its value on random tiny weights says nothing of quality:
    # a cache decision that flips with the summation order moves it a lot (a fresh-clone CI run failed the old
    # bound, more than 10 dB, with the same code that passed it elsewhere); only full-size runs judge it.
    psnr = figures["wan_cache_psnr_db"]
    assert psnr is None or psnr > 0, figures["wan_cache_steps_reused"]
    # Memory figures are CUDA-only; the goals are only judged at full scale on CUDA.
    assert "sdxl_baseline_peak_gib" not in figures and "sdxl_goal_1s" not in figures


def refuse_constant(name: str):
    raise ValueError(f"{name} is no JSON number")


def test_equal_images_have_no_psnr_figure_rather_than_infinity():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    assert gpu_speed.psnr(image, image) == float("inf") and gpu_speed.decibels(float("inf")) is None
    assert gpu_speed.decibels(gpu_speed.psnr(image, image + 1)) == 48.13
    assert json.loads(json.dumps({"psnr_db": gpu_speed.decibels(float("inf"))}), parse_constant=refuse_constant)


def test_the_fp8_step_measures_speed_and_quality_in_bf16(tiny_cache, float8_anywhere, monkeypatch):
    """`sdxl_fp8` as the GPU run will take it (bf16, compiled), on the tiny SDXL past FP8's refusal of a CPU
    (stood in: no CUDA here) and torchao's card check (float8_anywhere). Compiled by dynamo alone ("eager"): the
    float8 weights through AOTAutograd, as inductor takes them, are test_speed_options.py's (twice the time here)."""
    from generation import fp8
    from generation.capability import Runtime
    from generation.image import ImagePipeline

    monkeypatch.setattr(fp8, "refusal", lambda device: None)
    runtime = Runtime(device="cpu", dtype="bfloat16")
    capability = ImagePipeline.load("tiny", runtime)
    request = image_request(width=128, height=128, num_inference_steps=3)
    figures = gpu_speed.measure_fp8(capability, Gpu(runtime), request, 2, 1234, "eager")
    assert figures["sdxl_fp8_compiled"] and figures["sdxl_fp8_s_per_image"] > 0
    assert figures["sdxl_fp8_psnr_db"] > 30 and 0.95 < figures["sdxl_fp8_ssim"] <= 1
    assert type(capability.pipe.unet.conv_in.weight).__name__ == "Parameter"  # convolutions stay bf16
    linear = capability.pipe.unet._orig_mod.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(linear.weight).__name__ == "Float8Tensor"


def test_a_failing_step_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated\nfailure")

    monkeypatch.setattr(bench_gpu_module, "measure_wan", broken)
    figures = bench_gpu("tiny", "cpu", skip=("sdxl_baseline", "sdxl_channels_last"), log=quiet)
    assert figures["error_wan"] == "RuntimeError: simulated failure"
    assert figures["skipped_sdxl_baseline"] == "skipped"
    assert figures["sdxl_with_wan_s_per_image"] > 0 and figures["sdxl_fused_qkv_s_per_image"] > 0
    # inductor is CUDA-only: its compile steps are skipped on the CPU, and said so.
    cuda_only = "inductor off CUDA: minutes on a CPU, CUDA only"
    assert figures["skipped_sdxl_compiled_default"] == cuda_only
    assert figures["skipped_sdxl_compiled_max_autotune_no_cudagraphs"] == cuda_only
    assert figures["skipped_sdxl_compile_cache"] == cuda_only


def test_the_budget_skips_what_does_not_fit_and_says_why():
    figures = bench_gpu("tiny", "cpu", budget_s=0, log=quiet)
    assert figures["skipped_sdxl_build"].startswith("needs ~0 s, 0 s left of the 0 s budget")
    assert figures["skipped_sdxl_baseline"] == "sdxl not available"
    assert figures["skipped_wan"] == "wan not available"
    assert "sdxl_best_mode" not in figures


def test_steps_are_named_for_the_cli_and_the_section_is_skipped_without_cuda(capsys):
    assert compiled_step("max-autotune-no-cudagraphs") == "sdxl_compiled_max_autotune_no_cudagraphs"
    assert main(["--scale", "tiny", "--device", "cpu", "--budget", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {f"skipped_{step}" for step in STEPS} <= set(printed)
    with pytest.raises(SystemExit):
        main(["--skip", "sdxl_nonsense"])
    if not torch.cuda.is_available():
        assert bench_gpu() == {"skipped": "no CUDA device"}


def test_memory_figures_and_goals_from_cuda_statistics():
    """The CUDA-only branches, on a stand-in for torch.cuda (mocked: there is no GPU here)."""
    calls = []
    cuda = SimpleNamespace(
        synchronize=lambda: calls.append("sync"),
        empty_cache=lambda: calls.append("empty"),
        reset_peak_memory_stats=lambda: calls.append("reset"),
        memory_allocated=lambda: int(7.25 * GIB),
        max_memory_allocated=lambda: int(9.5 * GIB),
        max_memory_reserved=lambda: int(10 * GIB),
    )
    gpu = Gpu(SimpleNamespace(is_cuda=True))
    gpu.torch = SimpleNamespace(cuda=cuda)
    gpu.reset_peak()
    assert calls == ["sync", "empty", "reset"]
    assert gpu.allocated_gib() == 7.25
    assert gpu.peaks("sdxl_baseline") == {"sdxl_baseline_peak_gib": 9.5, "sdxl_baseline_peak_reserved_gib": 10.0}

    figures = {
        "sdxl_baseline_s_per_image": 2.4,
        "sdxl_compiled_default_s_per_image": 0.95,
        "sdxl_with_wan_s_per_image": 0.5,
        "sdxl_resident_gib": 6.5,
        "both_resident_gib": 21.0,
        "wan_with_sdxl_peak_gib": 24.0,
        "wan_with_sdxl_peak_reserved_gib": 25.0,
        "sdxl_with_wan_peak_reserved_gib": 23.0,
    }
    summarize(figures, judge_goals=True)
    assert (figures["sdxl_best_mode"], figures["sdxl_best_s_per_image"]) == ("compiled_default", 0.95)
    assert figures["sdxl_goal_1s"] == "met"
    assert figures["wan_alone_peak_gib_est"] == 17.5
    assert (figures["both_peak_reserved_gib"], figures["both_goal_24gb"]) == (25.0, "missed")
