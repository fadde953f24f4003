"""The speed options' steps of the GPU benchmark (bench/gpu.py runs them; issue #14's goals).

- `measure_compile_cache`: how long the background compile of SDXL's UNet takes with an empty portable cache
  (`compile_cold_s`) and again in a "fresh worker" (empty local inductor cache, dynamo reset) that loads the
  file the first one wrote (`compile_warm_s`); the worker serves eagerly meanwhile, so readiness is the build
  and placement time (`sdxl_build_s`), not these.
- `measure_batch`: images per second when `n` jobs share one UNet batch (`Engine.generate_batch`'s path).
- `measure_fp8`: SDXL with the UNet in float8 (torchao, row-wise), seconds per image and its PSNR / SSIM against
  the bf16 images of the same seeds. Quantizes the UNet in place: the last SDXL step.
- `measure_wan_cache`: Wan with First Block Cache against the full run: speed-up and PSNR of the frames.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np

SSIM_WINDOW = 7  # skimage's default window, uniform
QUALITY_SEEDS = 2


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays, dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def decibels(value: float) -> float | None:
    """A PSNR figure for the JSON file: None where the images are equal (inf is no JSON number)."""
    return round(value, 2) if np.isfinite(value) else None


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 HxWxC images (Wang et al. 2004 constants, 7x7 uniform window per channel)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(t):
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    n = SSIM_WINDOW**2
    vx, vy, cov = vx * n / (n - 1), vy * n / (n - 1), cov * n / (n - 1)  # sample variances, as skimage
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(value.mean())


def _timed(gpu, fn) -> float:
    return _timed_result(gpu, fn)[0]


def _timed_result(gpu, fn):
    gpu.sync()
    t0 = time.perf_counter()
    value = fn()
    gpu.sync()
    return time.perf_counter() - t0, value


def measure_batch(capability, gpu, request, sizes: tuple[int, ...], seed: int) -> dict:
    """Per batch size n: one warm-up batch, then one timed batch of n jobs (seeds seed..seed+n-1)."""
    from dataclasses import replace

    from generation.image import BatchItem

    figures: dict = {}
    steps = request.num_inference_steps
    for n in sizes:
        items = [BatchItem(replace(request, seed=seed + i), seed + i) for i in range(n)]
        capability.generate_batch(items)
        seconds = _timed(gpu, lambda: capability.generate_batch(items))
        figures[f"sdxl_batch{n}_{steps}steps_images_per_s"] = round(n / seconds, 3)
    return figures


def measure_compile_cache(capability, gpu, backend, request, seed: int, runs: int) -> dict:
    """Cold then warm background compile of the (already fused) UNet through generation.compiling, warmed up at
    the first of its WARM_UP_SHAPES only (SDXL's 1024x1024 job: one graph, so that the step fits a lent GPU's
    time; the worker compiles all of them), then `request` timed as jobs run it once that shape is compiled (the
    run-only module: the product's compiled path); the eager UNet is put back afterwards."""
    import statistics

    import torch

    from generation.compiling import BackgroundCompile, CompileCache

    pipe = capability.pipe
    eager = pipe.unet
    figures: dict = {}
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="firegen-compile-bench-") as folder:
        try:
            for run in ("cold", "warm"):
                cache = CompileCache(folder, capability.runtime.device, "image")  # a fresh worker's
                # A fresh worker: an empty local inductor cache, nothing compiled in memory; only the file helps.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, f"local-{run}")
                torch._dynamo.reset()
                torch.compiler.reset()
                pipe.unet = eager
                compile_ = BackgroundCompile(
                    pipe,
                    "unet",
                    capability.denoiser,
                    capability.install_denoiser,
                    backend,
                    capability.compile_warm_up,
                    capability.WARM_UP_SHAPES[:1],
                    threading.Lock(),
                    cache,
                ).start()
                compile_.wait()
                if compile_.state != "compiled":
                    raise RuntimeError(f"{run} compile failed: {compile_.error}")
                gpu.sync()
                figures[f"compile_{run}_s"] = round(compile_.seconds, 1)
                figures[f"compile_{run}_cache_loaded"] = compile_.cache_hit
            capability.generate(request, seed)  # the first call's one-off costs (cuDNN's algorithm search)
            times = [_timed(gpu, lambda: capability.generate(request, seed)) for _ in range(runs)]
            figures["sdxl_product_compiled_s_per_image"] = round(statistics.median(times), 3)  # one of the modes
            size = cache.path.stat().st_size if cache.path.exists() else 0
            figures["compile_cache_mib"] = round(size / 2**20, 1)
            figures["compile_warm_up_shapes"] = 1
        finally:
            pipe.unet = eager
            torch._dynamo.reset()
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return figures


def measure_fp8(capability, gpu, request, runs: int, seed: int, compile_backend: str | None) -> dict:
    """bf16 reference images of QUALITY_SEEDS seeds, then the UNet in float8 (and compiled with `compile_backend`
    when given): seconds per image, PSNR and SSIM of the same seeds. Refused (figure `sdxl_fp8_refused`) where
    FP8 can't run."""
    import statistics

    import torch

    from generation import fp8

    reason = fp8.refusal(capability.runtime.device)
    if reason:
        return {"sdxl_fp8_refused": reason}
    seeds = [seed + i for i in range(QUALITY_SEEDS)]
    reference = [np.asarray(capability.generate(request, s)[0]) for s in seeds]
    fp8.quantize(capability.pipe.unet)
    if compile_backend:
        torch._dynamo.reset()
        capability.pipe.unet = torch.compile(capability.pipe.unet, backend=compile_backend, fullgraph=True)
    first = _timed(gpu, lambda: capability.generate(request, seed))
    times = [_timed(gpu, lambda: capability.generate(request, seed)) for _ in range(runs)]
    images = [np.asarray(capability.generate(request, s)[0]) for s in seeds]
    return {
        "sdxl_fp8_s_per_image": round(statistics.median(times), 3),
        "sdxl_fp8_first_call_s": round(first, 2),
        "sdxl_fp8_compiled": bool(compile_backend),
        "sdxl_fp8_psnr_db": decibels(float(np.mean([psnr(a, b) for a, b in zip(reference, images)]))),
        "sdxl_fp8_ssim": round(float(np.mean([ssim(a, b) for a, b in zip(reference, images)])), 4),
        **gpu.peaks("sdxl_fp8"),
    }


def measure_wan_cache(capability, gpu, request, threshold: float, seed: int) -> dict:
    """The same video with every step computed, then with First Block Cache at `threshold` (removed again)."""
    from generation import video_speed

    transformer = video_speed.denoiser(capability.pipe.transformer)  # inside the CFG-batching wrapper
    full_s, full = _timed_result(gpu, lambda: capability.generate(request, seed))
    video_speed.apply_step_cache(transformer, threshold)
    decisions = CacheDecisions(transformer)
    try:
        cached_s, cached = _timed_result(gpu, lambda: capability.generate(request, seed))
    finally:
        transformer.disable_cache()
    steps = request.num_inference_steps
    return {
        "wan_cache_threshold": threshold,
        f"wan_full_{steps}steps_s": round(full_s, 2),
        f"wan_cache_{steps}steps_s": round(cached_s, 2),
        "wan_cache_speedup": round(full_s / cached_s, 2),
        "wan_cache_psnr_db": decibels(psnr(cached, full)),
        "wan_cache_steps_reused": f"{decisions.reused} of {decisions.reused + decisions.computed}",
    }


class CacheDecisions:
    """First Block Cache's per-step decisions on `transformer` since it was made: steps whose other blocks ran
    (`computed`) or were reused from the cache (`reused`). Counted at the decision of the cache's leader block."""

    LEADER_HOOK = "fbc_leader_block_hook"  # diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK

    def __init__(self, transformer):
        self.computed = self.reused = 0
        registries = [module._diffusers_hook for module in transformer.modules() if hasattr(module, "_diffusers_hook")]
        [hook] = [hook for hook in (r.get_hook(self.LEADER_HOOK) for r in registries) if hook is not None]
        decide = hook._should_compute_remaining_blocks

        def counted(residual) -> bool:
            compute = decide(residual)
            if compute:
                self.computed += 1
            else:
                self.reused += 1
            return compute

        hook._should_compute_remaining_blocks = counted
