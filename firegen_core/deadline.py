"""How long a job may run: a multiple of its estimated GPU time, never under a floor. Pure.

deadline = max(floor, multiple x estimate)

The estimate is the measured cost of the full-size models on an H100 (README "Benchmarks"): SDXL 30 steps at
1024x1024 in 2.46 s (0.082 s per step per megapixel and image), Wan 2.1 at 1.32 s per step for 81 frames of
480x832 plus 4.1 s to decode. Attention grows faster than linearly with size, so the per-pixel rate is a rough
figure: the multiple (default 5) covers slower cards and that error, the floor (default 120 s) covers loading
and small jobs. On cards much slower than an H100 (L4, A10) raise JOB_TIMEOUT_MULTIPLE.

`firegen_core.quota` (per-user accounting) estimates the same cost; when both exist, this module's
`estimated_seconds` is the one to keep in a single place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import GenerationRequest

IMAGE_STEP_SECONDS_PER_MEGAPIXEL = 0.082
VIDEO_STEP_SECONDS_PER_MEGAVOXEL = 1.32 / (81 * 480 * 832 / 1e6)
VIDEO_DECODE_SECONDS_PER_MEGAVOXEL = 4.1 / (81 * 480 * 832 / 1e6)

DEFAULT_FLOOR_SECONDS = 120.0
DEFAULT_MULTIPLE = 5.0


def estimated_seconds(request: GenerationRequest) -> float:
    """The GPU time the job should take on the reference card (an H100), from its parameters."""
    steps = request.num_inference_steps
    if request.is_video:
        megavoxels = request.num_frames * request.video_width * request.video_height / 1e6
        return megavoxels * (steps * VIDEO_STEP_SECONDS_PER_MEGAVOXEL + VIDEO_DECODE_SECONDS_PER_MEGAVOXEL)
    megapixels = request.width * request.height / 1e6
    return request.num_images_per_prompt * steps * megapixels * IMAGE_STEP_SECONDS_PER_MEGAPIXEL


@dataclass(frozen=True)
class Deadline:
    """JOB_TIMEOUT_FLOOR_SECONDS and JOB_TIMEOUT_MULTIPLE."""

    floor_seconds: float = DEFAULT_FLOOR_SECONDS
    multiple: float = DEFAULT_MULTIPLE

    def __post_init__(self) -> None:
        if self.floor_seconds <= 0 or self.multiple <= 0:
            raise ValueError(f"invalid {self!r}")

    def seconds(self, request: GenerationRequest | None) -> float:
        """The time a job may run, from its claim to its last write; the floor when its request is unknown."""
        if request is None:
            return self.floor_seconds
        return max(self.floor_seconds, self.multiple * estimated_seconds(request))


def timeout_message(seconds: float) -> str:
    return f"Generation stopped: it ran past its time limit of {round(seconds, 1):g} s"
