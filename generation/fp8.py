"""FIREGEN_FP8=on: the denoisers' linear layers in float8 (torchao: dynamic activation and weight scaling, one
scale per row), for Hopper/Ada GPUs. Opt-in: lossy (its PSNR/SSIM against bf16 is measured by bench/gpu.py).

torchao is the `fp8` extra (the image installs it): this module imports it only when FP8 is asked for (with FP8 off,
the lines transformers' and diffusers' own import of it logs are dropped: `quiet_unused_import`), and a worker asked
for FP8 where it cannot run it (no CUDA, a card without float8 tensor cores, torchao missing) refuses to start
with one line naming the setting, instead of silently serving the slower bf16 it was not configured for.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable

SETTING = "FIREGEN_FP8"
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
# float8 matmuls (torch._scaled_mm) need both dimensions divisible by 16; other layers stay in bf16.
ALIGNMENT = 16
# The floor under each activation row's absolute maximum when its scale is chosen. An all-zero row is common:
# SDXL's unconditional text embeddings are zeros when the negative prompt is empty (`force_zeros_for_empty_prompt`),
# and without a floor its scale is 0 and 0/0 makes the whole image NaN. Any real row's maximum is far above it.
ACTIVATION_FLOOR = 1e-12


def refusal(device: str, dtype: str | None = None) -> str | None:
    """Why FP8 can't run on `device` in `dtype` (None: the card's own choice, bfloat16 where it can), as the one
    line start-up refuses with; None when it can."""
    if not device.startswith("cuda"):
        return f"{SETTING}=on needs a CUDA GPU with float8 support (this worker runs on {device}); unset it"
    import torch

    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{SETTING}=on needs compute capability 8.9+ (Ada, Hopper); {name} is {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("torchao") is None:
        return f"{SETTING}=on needs torchao (pip install 'firegen-worker[fp8]'), which is not installed"
    if dtype not in (None, "bfloat16"):
        # torchao's row-wise float8 takes bfloat16 weights alone (`_fits`): in float16 or float32 nothing was
        # quantized, and the worker served the slower model it was not configured for, saying nothing (an audit).
        return f"{SETTING}=on needs FIREGEN_DTYPE=bfloat16 (or unset), not {dtype}"
    return None


# transformers and diffusers import torchao whenever it is installed (their quantizer registries), so every worker
# loads it even with FP8 off, and on a machine that can't run its kernels (a CPU, no triton) the import logs these
# WARNING lines: about kernels such a worker never calls. Each is matched by its logger and exact message, so
# anything else torchao (or torch, or diffusers) says still shows; with FP8 on nothing is filtered.
_KERNEL_LIBRARY = re.compile(r"Failed to load \S*/torchao/_C\S*\.so: ")


def _registers_a_torchao_enum(record: logging.LogRecord) -> bool:
    """torch's deprecation note on torchao's own enums (KernelPreference, ...), which torchao registers on import."""
    registered = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return str(getattr(registered, "__module__", "")).startswith("torchao")


_IMPORT_NOISE: dict[str, Callable[[logging.LogRecord], bool]] = {
    "torchao": lambda record: bool(_KERNEL_LIBRARY.match(record.getMessage())),
    "torchao.kernel.intmm": lambda record: "Detected no triton" in record.getMessage(),
    "torch.utils._pytree": _registers_a_torchao_enum,
    "diffusers.quantizers.torchao.torchao_quantizer": lambda record: record.getMessage().startswith(
        "Unable to import `torchao` Tensor objects"
    ),
}


def _not_import_noise(record: logging.LogRecord) -> bool:
    is_noise = _IMPORT_NOISE.get(record.name)
    return not (is_noise and is_noise(record))


def quiet_unused_import() -> None:
    """With FP8 off: drop what torchao's import logs (above). Call before the models load; calling again is a no-op."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).addFilter(_not_import_noise)


def _fits(module, _name: str) -> bool:
    """An aligned bf16 linear layer. Layers a model keeps in float32 (Wan's time embedder: `from_pretrained`'s
    `_keep_in_fp32_modules`) stay as they are: torchao's row-wise float8 takes bf16 weights only, and those layers
    are kept in float32 for their precision."""
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and module.weight.dtype == torch.bfloat16
        and module.in_features % ALIGNMENT == 0
        and module.out_features % ALIGNMENT == 0
    )


def quantize(model) -> None:
    """Float8 dynamic activations and weights, row-wise scales, on `model`'s aligned linear layers (in place)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=ACTIVATION_FLOOR)
    quantize_(model, config, filter_fn=_fits)
