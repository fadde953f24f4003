"""Media encoding: PNG for images, H.264 MP4 for videos, and a probe that decodes an MP4 back (used by tests).

Outputs are deterministic: the same pixels always give the same bytes, so a retried job uploads an identical
object and tests can compare bytes. The MP4 is what browsers play inline: H.264, yuv420p, `moov` before `mdat`
(`+faststart`) so playback starts before the download ends.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

PNG = ("png", "image/png")
MP4 = ("mp4", "video/mp4")


@dataclass(frozen=True)
class VideoEncoding:
    """x264 settings. crf 18 is visually lossless for generated content; `preset` trades CPU time for size."""

    crf: int = 18
    preset: str = "medium"
    codec: str = "libx264"
    pixel_format: str = "yuv420p"  # the only 4:2:0 layout every browser decodes
    threads: int = 0  # 0: x264 picks; its threaded output is still deterministic


@dataclass(frozen=True)
class VideoProbe:
    frames: int
    fps: float
    width: int
    height: int
    codec: str
    pixel_format: str
    moov_before_mdat: bool


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image. Pillow writes no timestamp, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def to_uint8_frames(frames: np.ndarray | Sequence) -> np.ndarray:
    """(frames, height, width, 3) uint8 from floats in [0, 1] (diffusers' "np" output) or integers in 0..255."""
    array = np.asarray(frames)
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("integer frames must be in 0..255")
        array = array.astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (count, height, width, 3), got {array.shape}")
    return array


def encode_mp4(
    frames: np.ndarray | Sequence,
    fps: int,
    encoding: VideoEncoding = VideoEncoding(),
    *,
    between_frames: Callable[[], None] | None = None,
) -> bytes:
    """H.264 MP4 with exactly len(frames) frames at `fps`; width and height must be even (4:2:0 chroma).
    `between_frames` is called before each frame's encode (it may raise to stop, e.g. a cancelled job's)."""
    import av

    array = to_uint8_frames(frames)
    count, height, width, _ = array.shape
    if count == 0:
        raise ValueError("a video needs at least one frame")
    if width % 2 or height % 2:
        raise ValueError(f"video width and height must be even for {encoding.pixel_format}, got {width}x{height}")
    # +faststart rewrites the file to move `moov` ahead, which FFmpeg does by reopening it by name: a real file,
    # not a BytesIO. bitexact keeps the encoder's version string and creation times out: same frames, same bytes.
    with tempfile.TemporaryDirectory(prefix="firegen-mp4-") as folder:
        path = os.path.join(folder, "video.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart", "fflags": "+bitexact"}) as out:
            _write_frames(out, array, fps, encoding, between_frames)
        with open(path, "rb") as file:
            return file.read()


@functools.cache
def _x264_cpu_options() -> dict[str, str]:
    """x264's AVX-512 code is not deterministic on small clips: measured with PyAV 18 on an AVX-512 AMD EPYC,
    a 64x48 clip encoded 60 times in a process that had imported torch gave 4 different files (decoded frames up
    to 10 levels apart), and 1 with x264 held to AVX2. Where the CPU has AVX-512, x264 stops at AVX2 (every such
    CPU has AVX2): the same bytes from the same pixels, at no measured cost (81 frames of 832x480 took 2.24 s either
    way on two cores of that EPYC)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if "avx512f" in flags and "avx2" in flags else {}


def _write_frames(
    container, array: np.ndarray, fps: int, encoding: VideoEncoding, between_frames: Callable[[], None] | None
) -> None:
    import av

    _, height, width, _ = array.shape
    stream = container.add_stream(encoding.codec, rate=Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, encoding.pixel_format
    stream.time_base = Fraction(1, fps)
    stream.codec_context.flags |= av.codec.context.Flags.bitexact
    stream.options = {
        "crf": str(encoding.crf),
        "preset": encoding.preset,
        "threads": str(encoding.threads),
        **_x264_cpu_options(),
    }
    for index, pixels in enumerate(array):
        if between_frames is not None:
            between_frames()
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = index
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _top_level_boxes(data: bytes) -> Iterable[str]:
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        yield data[offset + 4 : offset + 8].decode("latin-1")
        if size == 1:  # 64-bit size follows the type
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        if size < 8:
            return
        offset += size


def probe_mp4(data: bytes) -> VideoProbe:
    """Decode every frame of an MP4 and report what a player would see."""
    import av

    boxes = list(_top_level_boxes(data))
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return VideoProbe(
            frames=frames,
            fps=float(stream.average_rate or 0),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            pixel_format=stream.codec_context.pix_fmt or "",
            moov_before_mdat="moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"),
        )


def video_info(frames: int, fps: int, width: int, height: int) -> dict:
    """The contract's `video_info`: {frames, fps, duration_seconds, width, height}. The duration is frames / fps
    as it is, not rounded: a client that checks it against its own frames / fps finds them equal (16 frames at
    6 fps was 2.667)."""
    return {
        "frames": frames,
        "fps": fps,
        "duration_seconds": frames / fps,
        "width": width,
        "height": height,
    }
