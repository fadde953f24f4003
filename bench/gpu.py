"""The GPU section of the benchmark: full-size SDXL and Wan 2.1 (T2V 1.3B) with random weights.

No weights can be downloaded on the benchmark machines, so the real architectures are built in code from their
public configs (below, checked against the diffusers/transformers class signatures) with random weights: same
shapes, same FLOPs, same memory as the real models; only the pictures are noise. The models are built directly on
the device in the product's precision (bf16 on CUDA; the few modules `from_pretrained` keeps in float32 are kept
in float32 here too), assembled into the real pipelines, placed with the product's `place` methods and run
through the product's `ImagePipeline.generate` / `VideoPipeline.generate`.

Figures (one flat dict; `python -m bench.gpu` prints it as JSON, `make bench` as a table):
- SDXL 1024x1024, 30 steps, one image, guidance 7.5 (CFG: the UNet runs on a batch of 2): the median of 3 timed
  images after one warm-up (`sdxl_<mode>_s_per_image`) and the peak GPU memory, in cumulative modes:
  `baseline` (bf16 + SDPA: what `DiffusionCapability.place` does), `channels_last` (+ the UNet in channels-last:
  what `ImagePipeline.place` does, i.e. the product today), `fused_qkv` (+ `pipe.fuse_qkv_projections()`),
  `compiled_<mode>` (+ `torch.compile` of the UNet, fullgraph, for each mode of COMPILE_MODES; the first call,
  which compiles, is timed apart as `..._first_call_s` and `..._compile_s`);
- Wan 2.1 480x832, 81 frames, guidance 5.0 (two transformer passes a step): one warm-up run of 2 steps, then one
  of 4 steps (`wan_4steps_s`, as measured) timed at each step's end through the progress callback: `wan_step_s`,
  `wan_encode_s` (text encoding, latents), `wan_decode_s` (VAE decode, frames to uint8) and the 50-step total
  extrapolated from them (`wan_50steps_extrapolated_s`);
- memory (CUDA): each model resident, both resident together (what one worker holds), the peak while generating
  with both resident (`both_peak_reserved_gib`; goal: fits a 24 GB card); `--offload-text-encoder on` measures
  the 24 GB configuration (Wan's UMT5 in CPU memory: `generation.video.offload_text_encoder`);
- `sdxl_best_mode`, `sdxl_best_s_per_image` and, at full scale on CUDA, `sdxl_goal_1s` / `both_goal_24gb`.
Each step is its own try (an error is reported as `error_<step>` and the rest goes on) and runs only if the
time budget still holds its estimate (else `skipped_<step>` says why), so the section fits the budget it is given
(480 s by default); with `out`, the figures so far are rewritten to a JSON file after every step.

`scale="tiny"` builds the same code path from tiny configs (the widths and depths of `generation.tiny`) so the
plumbing runs on a CPU in seconds (tests/test_bench_gpu.py); `parameter_counts()` builds the full-size models on
the meta device (no memory) to check the configs against the published parameter counts.

Run alone, on a machine with CUDA (diffusers must be importable):
    python -m bench.gpu --out out/bench/gpu.json     # --help for the budget, compile modes, steps to skip
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from bench import gpu_speed

PROMPT = "A sunset over mountains"
SEED = 1234
GIB = 2**30
DEFAULT_BUDGET_S = 480.0

# --- configs: the public configs of the real models --------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280), concatenated
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG (1280) + 6 micro-conditions x 256
)
# vae/config.json (83,653,863 parameters).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # only acts in float16; in bf16 the pipeline decodes in bf16
)
# The tokenizers are built in code (generation.tiny: byte-level, no merges): their ids (bos 0, eos 1) are what the
# encoders' configs name; the vocabularies keep the real sizes so the embeddings are the real ones.
_CLIP_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)
# text_encoder/config.json: CLIP ViT-L/14 text tower (123,060,480 parameters).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    **_CLIP_IDS,
)
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14 text tower with projection (694,659,840 parameters).
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    **_CLIP_IDS,
)
# scheduler/scheduler_config.json.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (dim 1536 = 12 x 128; ~1.42B parameters).
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
# vae/config.json (latents_mean/std: the class defaults are Wan 2.1's; ~127M parameters).
WAN_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)
# text_encoder/config.json: the UMT5-XXL encoder (google/umt5-xxl; 5,680,910,336 parameters).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    is_encoder_decoder=False,
)
# scheduler/scheduler_config.json: UniPC on flow-matching sigmas.
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

# Published parameter counts (the real checkpoints), for the meta-device check.
PUBLISHED_PARAMETERS = {
    "sdxl_unet": 2.567e9,
    "sdxl_vae": 83.6e6,
    "clip_l": 123e6,
    "clip_bigg": 695e6,
    "wan_transformer": 1.42e9,
    "wan_vae": 127e6,
    "umt5_xxl": 5.68e9,
}

# --- the tiny scale: the same classes and code path, generation.tiny's widths --------------------------------

_TINY_CLIP = dict(intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu", **_CLIP_IDS)
TINY = {
    "sdxl_unet": dict(
        SDXL_UNET,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=48,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=1,
    ),
    "sdxl_vae": dict(SDXL_VAE, block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=1),
    "clip_l": dict(_TINY_CLIP, vocab_size=600, hidden_size=16, projection_dim=16),
    "clip_bigg": dict(_TINY_CLIP, vocab_size=600, hidden_size=32, projection_dim=32),
    "wan_transformer": dict(
        WAN_TRANSFORMER,
        num_attention_heads=1,
        attention_head_dim=12,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,  # First Block Cache needs a head and a tail block
    ),
    "wan_vae": dict(WAN_VAE, base_dim=1, num_res_blocks=0),
    "umt5_xxl": dict(
        UMT5_XXL,
        vocab_size=256,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
    ),
}
FULL = {
    "sdxl_unet": SDXL_UNET,
    "sdxl_vae": SDXL_VAE,
    "clip_l": CLIP_L,
    "clip_bigg": CLIP_BIGG,
    "wan_transformer": WAN_TRANSFORMER,
    "wan_vae": WAN_VAE,
    "umt5_xxl": UMT5_XXL,
}
CONFIGS = {"full": FULL, "tiny": TINY}

# What is generated at each scale. `runs`: timed SDXL images per mode after one warm-up.
WORKLOADS = {
    "full": dict(
        sdxl_size=(1024, 1024),
        sdxl_steps=30,
        runs=3,
        wan_size=(480, 832),
        wan_frames=81,
        wan_steps=50,
        wan_measured_steps=4,
        wan_warmup_steps=2,
        batch_sizes=(1, 4),
        batch_steps=20,
        wan_cache_steps=10,
    ),
    "tiny": dict(
        sdxl_size=(64, 64),
        sdxl_steps=2,
        runs=1,
        wan_size=(32, 48),
        wan_frames=5,
        wan_steps=50,
        wan_measured_steps=2,
        wan_warmup_steps=1,
        batch_sizes=(1, 2),
        batch_steps=2,
        wan_cache_steps=4,
    ),
}

# torch.compile modes tried on the UNet, each its own step `sdxl_compiled_<mode>`, in this order: "default" first
# (about a minute to compile), then max-autotune without CUDA graphs (Triton GEMM/conv templates benchmarked against
# cuBLAS/cuDNN: minutes on a fresh machine) if the budget still holds it. CUDA graphs ("reduce-overhead") buy
# little here: at 1024x1024 a UNet call is tens of milliseconds of GPU work against a few of kernel launches.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
STEPS = (
    "sdxl_build",
    "sdxl_baseline",
    "sdxl_channels_last",
    "wan_build",
    "wan",
    "wan_cache",
    "sdxl_with_wan",
    "sdxl_fused_qkv",
    "sdxl_batch",
    "sdxl_compile_cache",
    "sdxl_fp8",
)
# Rough cost of each step on an H100 at full scale (seconds), for the budget: a step starts only if this much is
# left (a compile mode not named here: 240 s).
ESTIMATES_S = {
    "sdxl_build": 30,
    "sdxl_baseline": 25,
    "sdxl_channels_last": 25,
    "wan_build": 40,
    "wan": 75,
    "sdxl_with_wan": 10,
    "sdxl_fused_qkv": 25,
    "wan_cache": 60,
    "sdxl_batch": 45,
    "sdxl_compile_cache": 200,
    "sdxl_fp8": 150,
    "sdxl_compiled_default": 120,
    "sdxl_compiled_max_autotune_no_cudagraphs": 200,
}


def compiled_step(mode: str) -> str:
    """The step (and figure prefix) of a torch.compile mode: sdxl_compiled_default, ..._max_autotune_no_cudagraphs."""
    return "sdxl_compiled_" + mode.replace("-", "_")


# --- building -----------------------------------------------------------------------------------------------


@contextmanager
def _building(device: str, dtype) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype`, without autograd: a 5.7B-parameter encoder in bf16 on
    a GPU takes seconds; on the meta device nothing is allocated at all."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(previous)


def _keep_in_float32(model, dtype) -> None:
    """Put back in float32 the parameters that `from_pretrained` keeps in float32 at this dtype (diffusers:
    `_keep_in_fp32_modules` always; transformers: `_keep_in_fp32_modules_strict` in fp16/bf16, the plain list in
    fp16 only), so the modules compute as they do in the product."""
    import torch

    if dtype == torch.float32:
        return
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        keep = set(model._keep_in_fp32_modules or [])
    else:
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep:
        return
    for name, param in model.named_parameters():
        if param.is_floating_point() and keep & set(name.split(".")):
            param.data = param.data.to(torch.float32)


def build_components(names, scale: str = "full", device: str = "cpu", dtype=None) -> dict:
    """The named models (keys of `FULL`) at `scale`, built on `device` in `dtype` with random weights."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLWan, UNet2DConditionModel, WanTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, UMT5Config, UMT5EncoderModel

    dtype = dtype or torch.float32
    configs = CONFIGS[scale]
    makers: dict[str, Callable] = {
        "sdxl_unet": lambda c: UNet2DConditionModel(**c),
        "sdxl_vae": lambda c: AutoencoderKL(**c),
        "clip_l": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "clip_bigg": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
        "wan_transformer": lambda c: WanTransformer3DModel(**c),
        "wan_vae": lambda c: AutoencoderKLWan(**c),
        "umt5_xxl": lambda c: UMT5EncoderModel(UMT5Config(**c)),
    }
    built = {}
    with _building(device, dtype):
        for name in names:
            model = makers[name](dict(configs[name]))
            _keep_in_float32(model, dtype)
            built[name] = model.eval()
    return built


def parameter_counts(scale: str = "full") -> dict[str, int]:
    """Parameters of each model at `scale`, built on the meta device (no memory, a second or two)."""
    models = build_components(list(FULL), scale, device="meta")
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def build_sdxl(scale: str, runtime):
    """StableDiffusionXLPipeline of random weights on `runtime`'s device and dtype (not yet placed)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from generation import tiny

    parts = build_components(
        ("sdxl_unet", "sdxl_vae", "clip_l", "clip_bigg"), scale, runtime.device, runtime.torch_dtype
    )
    return StableDiffusionXLPipeline(
        vae=parts["sdxl_vae"],
        text_encoder=parts["clip_l"],
        text_encoder_2=parts["clip_bigg"],
        tokenizer=tiny._clip_tokenizer(),
        tokenizer_2=tiny._clip_tokenizer(),
        unet=parts["sdxl_unet"],
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),  # on the CPU, as from_pretrained makes it
    )


def build_wan(scale: str, runtime):
    """WanPipeline of random weights on `runtime`'s device and dtype (not yet placed)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from generation import tiny

    parts = build_components(("wan_transformer", "wan_vae", "umt5_xxl"), scale, runtime.device, runtime.torch_dtype)
    return WanPipeline(
        tokenizer=tiny._t5_tokenizer(),
        text_encoder=parts["umt5_xxl"],
        vae=parts["wan_vae"],
        transformer=parts["wan_transformer"],
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
    )


# --- measuring ----------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float, scale: str):
        self.seconds = seconds
        self.scale = scale
        self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def refusal(self, step: str) -> str | None:
        """Why `step` must not start now, or None. Estimates are for the full scale; tiny steps take ~nothing."""
        need = ESTIMATES_S.get(step, 240) if self.scale == "full" else 0
        left = self.left()
        if left < need or left <= 0:
            return f"needs ~{need} s, {max(left, 0):.0f} s left of the {self.seconds:.0f} s budget"
        return None


class Gpu:
    """Synchronisation and memory statistics; no-ops off CUDA."""

    def __init__(self, runtime):
        import torch

        self.torch = torch
        self.cuda = runtime.is_cuda

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Start the peak statistics afresh, with the allocator's cache emptied so the reserved peak is this
        measurement's need and not what an earlier one left cached."""
        if self.cuda:
            self.sync()
            self.free()
            self.torch.cuda.reset_peak_memory_stats()

    def allocated_gib(self) -> float | None:
        return round(self.torch.cuda.memory_allocated() / GIB, 2) if self.cuda else None

    def peaks(self, prefix: str) -> dict:
        if not self.cuda:
            return {}
        self.sync()
        return {
            f"{prefix}_peak_gib": round(self.torch.cuda.max_memory_allocated() / GIB, 2),
            f"{prefix}_peak_reserved_gib": round(self.torch.cuda.max_memory_reserved() / GIB, 2),
        }

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _timed(gpu: Gpu, fn: Callable) -> float:
    gpu.sync()
    t0 = time.perf_counter()
    fn()
    gpu.sync()
    return time.perf_counter() - t0


def _image_request(work: dict):
    from firegen_core.contract import GenerationRequest

    height, width = work["sdxl_size"]
    return GenerationRequest(
        prompt=PROMPT, seed=SEED, width=width, height=height, num_inference_steps=work["sdxl_steps"]
    )


def _video_request(work: dict, steps: int):
    from firegen_core.contract import TEXT2VIDEO, GenerationRequest

    height, width = work["wan_size"]
    return GenerationRequest(
        prompt=PROMPT,
        seed=SEED,
        task_type=TEXT2VIDEO,
        num_frames=work["wan_frames"],
        video_width=width,
        video_height=height,
        num_inference_steps=steps,
    )


def measure_sdxl(capability, gpu: Gpu, work: dict, mode: str) -> dict:
    """One warm-up image (compiled modes: the compilation), then `runs` timed images; median seconds per image.
    The peak memory is the timed images' (steady state: compilation and autotuning are left out)."""
    request = _image_request(work)
    first = _timed(gpu, lambda: capability.generate(request, SEED))
    gpu.reset_peak()
    runs = [_timed(gpu, lambda: capability.generate(request, SEED)) for _ in range(work["runs"])]
    median = statistics.median(runs)
    figures = {
        f"sdxl_{mode}_s_per_image": round(median, 3),
        f"sdxl_{mode}_min_s": round(min(runs), 3),
        f"sdxl_{mode}_first_call_s": round(first, 2),
    }
    if mode.startswith("compiled"):
        figures[f"sdxl_{mode}_compile_s"] = round(first - median, 1)  # the first call's excess over a steady one
    figures.update(gpu.peaks(f"sdxl_{mode}"))
    return figures


def measure_wan(capability, gpu: Gpu, work: dict, steps: int) -> dict:
    """A warm-up run, then a run of `steps` steps timed at each step's end (synchronised)."""
    capability.generate(_video_request(work, work["wan_warmup_steps"]), SEED)
    marks: list[float] = []
    fractions = [0.0]

    def on_step(fraction: float) -> None:
        if fraction <= fractions[-1]:  # the decode's stop checks ask the last step's again
            return
        fractions.append(fraction)
        gpu.sync()
        marks.append(time.perf_counter())

    gpu.reset_peak()
    gpu.sync()
    t0 = time.perf_counter()
    capability.generate(_video_request(work, steps), SEED, on_step)
    gpu.sync()
    end = time.perf_counter()
    if len(marks) != steps:
        raise RuntimeError(f"expected {steps} step callbacks, got {len(marks)}")
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    step = statistics.median(gaps) if gaps else marks[0] - t0
    before = max(marks[0] - t0 - step, 0.0)  # text encoding (prompt and negative prompt) and latents
    after = end - marks[-1]  # VAE decode, post-processing to uint8 frames
    total = work["wan_steps"]
    return {
        f"wan_{steps}steps_s": round(end - t0, 2),
        "wan_step_s": round(step, 3),
        "wan_encode_s": round(before, 2),
        "wan_decode_s": round(after, 2),
        f"wan_{total}steps_extrapolated_s": round(before + total * step + after, 1),
        **gpu.peaks("wan_with_sdxl"),
    }


# --- the section --------------------------------------------------------------------------------------------


def bench_gpu(
    scale: str = "full",
    device: str | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    compile_modes: tuple[str, ...] = COMPILE_MODES,
    compile_backend: str = "inductor",
    wan_steps: int | None = None,
    skip: tuple[str, ...] = (),
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    offload: bool | None = None,
    video_cache_threshold: float = 0.05,
    attention: str = "auto",
) -> dict:
    """The GPU figures as one flat dict. Without CUDA (and no explicit `device`) the section is skipped.

    `skip`: steps not to run (STEPS, and `compiled_step(mode)` for each compile mode). Off CUDA the compile steps
    run only with a backend other than inductor (the tests trace the UNet with backend "eager": fullgraph must
    hold). `wan_steps`: denoising steps of the timed Wan run (default: the scale's). `out`: a JSON file rewritten
    after every step, so a run stopped from outside keeps what it measured.
    """
    try:
        import torch
    except ImportError:
        return {"skipped": "torch not installed"}
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device"}
        device = "cuda"
    import diffusers
    import transformers

    from generation.capability import DiffusionCapability, Runtime
    from generation.image import ImagePipeline
    from generation.video import VideoPipeline

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    # offload None: the product's auto (cards under 40 GiB); attention auto: the product's pick for the card
    runtime = Runtime.detect(device, offload=offload, attention=attention)
    gpu = Gpu(runtime)
    work = WORKLOADS[scale]
    wan_steps = wan_steps or work["wan_measured_steps"]
    budget = Budget(budget_s, scale)
    figures: dict = {
        "device": torch.cuda.get_device_name() if runtime.is_cuda else device,
        "scale": scale,
        # The real models' architectures, sizes and FLOPs with random weights: speeds are theirs, quality (FP8's
        # PSNR, the step cache's reuse) is not.
        "weights": "random",
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),  # expandable segments: the image's reserved peaks
        "dtype": runtime.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "budget_s": budget_s,
        "offload_text_encoder": runtime.offload_text_encoder,
        "attention_backend": runtime.attention_backend,
        "sdxl_workload": "{}x{}, {} steps, 1 image, CFG".format(*work["sdxl_size"][::-1], work["sdxl_steps"]),
        "wan_workload": "{}x{}, {} frames, CFG".format(*work["wan_size"][::-1], work["wan_frames"]),
    }
    state: dict = {}

    def save() -> None:
        for key in SUMMARY:  # recomputed, and kept last
            figures.pop(key, None)
        summarize(figures, judge_goals=scale == "full" and runtime.is_cuda)
        figures["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{out}.partial")  # whole or not at all: the device may kill the run mid-write
            partial.write_text(json.dumps(figures, indent=2))
            os.replace(partial, out)

    def run(name: str, measure: Callable[[], dict | None], needs: tuple[str, ...] = ()) -> None:
        """Run one step in its own try, if not skipped, its inputs exist and the budget holds its estimate."""
        missing = [n for n in needs if n not in state]
        why = skipped.get(name) or (f"{missing[0]} not available" if missing else budget.refusal(name))
        if why:
            figures[f"skipped_{name}"] = why
            log(f"[gpu] {name}: skipped ({why})")
        else:
            log(f"[gpu] {name}: start ({budget.left():.0f} s of budget left)")
            t0 = time.perf_counter()
            try:
                figures.update(measure() or {})
            except Exception as exc:  # one failure must not lose the other figures
                traceback.print_exc()
                figures[f"error_{name}"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400]
            gpu.free()  # outside the except block: the failed attempt's frames (and tensors) are gone by now
            log(f"[gpu] {name}: done in {time.perf_counter() - t0:.1f} s")
        save()

    def sdxl_build() -> dict:
        t0 = time.perf_counter()
        pipe = build_sdxl(scale, runtime)
        DiffusionCapability.place(pipe, runtime)  # the base placement: the device only (bf16 + SDPA on CUDA)
        pipe.set_progress_bar_config(disable=True)
        gpu.sync()
        state["sdxl"] = ImagePipeline(pipe, runtime, f"random-{scale}")
        return {"sdxl_build_s": round(time.perf_counter() - t0, 1), "sdxl_resident_gib": gpu.allocated_gib()}

    def sdxl_channels_last() -> dict:
        ImagePipeline.place(state["sdxl"].pipe, runtime)  # the product's placement: channels-last UNet on CUDA
        return measure_sdxl(state["sdxl"], gpu, work, "channels_last")

    def wan_build() -> dict:
        t0 = time.perf_counter()
        pipe = build_wan(scale, runtime)
        VideoPipeline.place(pipe, runtime)  # the product's placement: VAE in float32 on CUDA
        pipe.set_progress_bar_config(disable=True)
        gpu.sync()
        capability = VideoPipeline(pipe, runtime, f"random-{scale}")
        result = {"wan_build_s": round(time.perf_counter() - t0, 1)}
        if runtime.is_cuda:
            resident = gpu.allocated_gib()
            if "sdxl" in state:
                result.update(
                    both_resident_gib=resident, wan_resident_gib=round(resident - figures["sdxl_resident_gib"], 2)
                )
            else:
                result["wan_resident_gib"] = resident
        state["wan"] = capability
        return result

    def sdxl_with_wan() -> dict:
        request = _image_request(work)
        gpu.reset_peak()
        seconds = _timed(gpu, lambda: state["sdxl"].generate(request, SEED))
        return {"sdxl_with_wan_s_per_image": round(seconds, 3), **gpu.peaks("sdxl_with_wan")}

    def sdxl_fused_qkv() -> dict:
        state["sdxl"].pipe.fuse_qkv_projections()  # the UNet's and the VAE's attention
        return measure_sdxl(state["sdxl"], gpu, work, "fused_qkv")

    def inductor_recipe() -> None:
        if compile_backend == "inductor":
            from torch._inductor import config as inductor_config

            inductor_config.conv_1x1_as_mm = True  # diffusers' recipe for the UNet's 1x1 convolutions, as the product's

    def sdxl_compiled(mode: str) -> dict:
        """torch.compile of the (channels-last, fused) UNet, fullgraph; put back to eager afterwards."""
        pipe = state["sdxl"].pipe
        inductor_recipe()
        torch._dynamo.reset()  # each mode compiles from scratch
        eager = pipe.unet
        options = {"mode": mode} if compile_backend == "inductor" else {}
        pipe.unet = torch.compile(eager, backend=compile_backend, fullgraph=True, **options)
        try:
            return measure_sdxl(state["sdxl"], gpu, work, compiled_step(mode)[len("sdxl_") :])
        finally:
            pipe.unet = eager
            torch._dynamo.reset()

    def sdxl_batch() -> dict:
        request = replace(_image_request(work), num_inference_steps=work["batch_steps"])
        return gpu_speed.measure_batch(state["sdxl"], gpu, request, work["batch_sizes"], SEED)

    def sdxl_compile_cache() -> dict:
        inductor_recipe()  # `--compile-modes=` (gpu_session.sh) leaves it to this step
        capability = state["sdxl"]
        width, height, _, _ = capability.WARM_UP_SHAPES[0]  # the job the one compiled shape serves
        request = replace(_image_request(work), width=width, height=height)
        return gpu_speed.measure_compile_cache(capability, gpu, compile_backend, request, SEED, work["runs"])

    def sdxl_fp8() -> dict:
        backend = compile_backend if runtime.is_cuda else None  # float8 gains come with inductor's fusions
        return gpu_speed.measure_fp8(state["sdxl"], gpu, _image_request(work), work["runs"], SEED, backend)

    def wan_cache() -> dict:
        request = _video_request(work, work["wan_cache_steps"])
        return gpu_speed.measure_wan_cache(state["wan"], gpu, request, video_cache_threshold, SEED)

    skipped = dict.fromkeys(skip, "skipped")
    if not runtime.is_cuda and compile_backend == "inductor":
        for name in (*(compiled_step(mode) for mode in compile_modes), "sdxl_compile_cache"):
            skipped.setdefault(name, "inductor off CUDA: minutes on a CPU, CUDA only")
    figures.update(compile_backend=compile_backend, compile_modes=",".join(compile_modes))

    run("sdxl_build", sdxl_build)
    run("sdxl_baseline", lambda: measure_sdxl(state["sdxl"], gpu, work, "baseline"), needs=("sdxl",))
    run("sdxl_channels_last", sdxl_channels_last, needs=("sdxl",))
    run("wan_build", wan_build)
    run("wan", lambda: measure_wan(state["wan"], gpu, work, wan_steps), needs=("wan",))
    run("wan_cache", wan_cache, needs=("wan",))
    run("sdxl_with_wan", sdxl_with_wan, needs=("sdxl", "wan"))
    state.pop("wan", None)  # Wan's memory goes back, so the SDXL-only modes below peak as SDXL alone
    gpu.free()
    run("sdxl_fused_qkv", sdxl_fused_qkv, needs=("sdxl",))
    for mode in compile_modes:
        run(compiled_step(mode), lambda: sdxl_compiled(mode), needs=("sdxl",))
    run("sdxl_batch", sdxl_batch, needs=("sdxl",))
    run("sdxl_compile_cache", sdxl_compile_cache, needs=("sdxl",))
    run("sdxl_fp8", sdxl_fp8, needs=("sdxl",))  # last: it quantizes the UNet in place

    state.clear()
    gpu.free()
    save()
    return figures


SUMMARY = (
    "sdxl_best_mode",
    "sdxl_best_s_per_image",
    "sdxl_goal_1s",
    "wan_alone_peak_gib_est",
    "both_peak_reserved_gib",
    "both_goal_24gb",
    "elapsed_s",
)


def summarize(figures: dict, judge_goals: bool) -> None:
    """The best SDXL mode and, at full scale on CUDA, the goals: <= 1.0 s per image; both models <= 24 GB."""
    modes = {
        key[len("sdxl_") : -len("_s_per_image")]: value
        for key, value in figures.items()
        if key.startswith("sdxl_")
        and key.endswith("_s_per_image")
        and key not in ("sdxl_with_wan_s_per_image", "sdxl_best_s_per_image")
    }
    if modes:
        best = min(modes, key=modes.get)
        figures.update(sdxl_best_mode=best, sdxl_best_s_per_image=modes[best])
        if judge_goals:
            figures["sdxl_goal_1s"] = "met" if modes[best] <= 1.0 else "missed"
    if "wan_with_sdxl_peak_gib" in figures and figures.get("both_resident_gib") is not None:
        # Wan ran with SDXL resident: its own peak is what it added to SDXL's weights.
        figures["wan_alone_peak_gib_est"] = round(figures["wan_with_sdxl_peak_gib"] - figures["sdxl_resident_gib"], 2)
    peaks = [figures[k] for k in ("wan_with_sdxl_peak_reserved_gib", "sdxl_with_wan_peak_reserved_gib") if k in figures]
    if peaks:
        figures["both_peak_reserved_gib"] = max(peaks)
        if judge_goals:
            # A "24 GB" card has 24 GiB, less ~0.5 GiB for the CUDA context outside PyTorch's allocator.
            figures["both_goal_24gb"] = "met" if max(peaks) <= 23.5 else "missed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--device", help="default: cuda if present, else the section is skipped")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds (default %(default)s)")
    parser.add_argument(
        "--compile-modes",
        default=",".join(COMPILE_MODES),
        help="comma-separated torch.compile modes for the UNet, in order (default %(default)s)",
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--wan-steps", type=int, help="denoising steps of the timed Wan run (default 4 at full scale)")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated steps not to run: "
        f"{','.join(STEPS)}, and sdxl_compiled_<mode> (e.g. sdxl_compiled_default)",
    )
    parser.add_argument("--out", help="JSON file, rewritten after every step")
    parser.add_argument(
        "--offload-text-encoder",
        choices=("auto", "on", "off"),
        default="auto",
        help="Wan's UMT5 encoder in CPU memory (default: the product's auto, on under 40 GiB)",
    )
    parser.add_argument(
        "--video-cache-threshold", type=float, default=0.05, help="First Block Cache threshold of the wan_cache step"
    )
    parser.add_argument(
        "--attention", default="auto", help="Wan's attention backend (FIREGEN_ATTENTION_BACKEND; default auto)"
    )
    parser.add_argument("--params", action="store_true", help="only print the full-size parameter counts (meta)")
    args = parser.parse_args(argv)
    if args.params:
        print(json.dumps(parameter_counts(args.scale), indent=2))
        return 0
    modes = tuple(m for m in args.compile_modes.split(",") if m)
    skip = tuple(s for s in args.skip.split(",") if s)
    steps = (*STEPS, *(compiled_step(mode) for mode in modes))
    unknown = set(skip) - set(steps)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; steps are {', '.join(steps)}")
    offload = {"auto": None, "on": True, "off": False}[args.offload_text_encoder]
    figures = bench_gpu(
        args.scale,
        args.device,
        args.budget,
        modes,
        args.compile_backend,
        args.wan_steps,
        skip,
        args.out,
        offload=offload,
        video_cache_threshold=args.video_cache_threshold,
        attention=args.attention,
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
