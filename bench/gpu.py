"""The GPU section of the benchmark: full-size architectures with random weights (same FLOPs as the real
models; no weights can be downloaded on the benchmark machines). Skipped where CUDA is absent.

Not yet measured on a GPU: this session had no device. See the README's benchmark section.
"""

from __future__ import annotations


def bench_gpu() -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "torch not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return {"skipped": "full-size random-weight SDXL/Wan runs not implemented yet"}
