"""Run one generation from the command line, without Firebase: `python -m generation --prompt "..." --out DIR`.

The request goes through the same contract as a runsync input (`use_cloud_storage: false`), so a bad value
prints the message a client would get. Models default to `tiny` here (set IMAGE_MODEL / VIDEO_MODEL for real
ones), so the command works on any machine. The files' paths and the seed go to stdout; the seconds spent (loading
the model, generating, encoding) to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from firegen_core import contract, errors

from .models import TINY
from .settings import SettingsError, model_settings


def number(text: str) -> int | float | str:
    """Read a flag as JSON would type it; anything else stays text, so the contract words the refusal."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# Flags that map one-to-one onto contract fields: (flag, field, how to read the value).
OPTIONS = (
    ("--negative-prompt", "negative_prompt", str),
    ("--seed", "seed", number),
    ("--width", "width", number),
    ("--height", "height", number),
    ("--num-images", "num_images_per_prompt", number),
    ("--steps", "num_inference_steps", number),
    ("--guidance", "guidance_scale", number),
    ("--num-frames", "num_frames", number),
    ("--fps", "fps", number),
    ("--video-width", "video_width", number),
    ("--video-height", "video_height", number),
    ("--video-guidance", "video_guidance_scale", number),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m generation", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG or MP4 files")
    parser.add_argument("--video", action="store_true", help="text2video (implied by any video option)")
    parser.add_argument("--name", default="generation", help="file name stem (default: generation)")
    for flag, name, kind in OPTIONS:
        parser.add_argument(flag, dest=name, type=kind)
    return parser.parse_args(argv)


def build_input(args: argparse.Namespace) -> dict:
    data = {"prompt": args.prompt, "use_cloud_storage": False}
    data.update({name: getattr(args, name) for _, name, _ in OPTIONS if getattr(args, name) is not None})
    if args.video and not contract.VIDEO_FIELDS & data.keys():
        # The contract makes a request a video one when a video field is given.
        data["num_frames"] = contract.PARAMS["num_frames"].default
    return data


def file_names(stem: str, count: int, extension: str) -> list[str]:
    """The worker's naming: stem.ext, stem_1.ext, stem_2.ext, ..."""
    return [f"{stem}{f'_{index}' if index else ''}.{extension}" for index in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        request = contract.parse_runsync_input(build_input(args))
    except contract.ContractError as error:
        print(error.message, file=sys.stderr)
        return 2
    try:  # the worker's model settings, with tiny models where none is set
        settings = model_settings(image_model=TINY, video_model=TINY)
    except SettingsError as error:  # a FIREGEN_* variable with a value it cannot take
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    from .engine import Engine, EngineConfig, quiet_loading  # after validation: it pulls in torch

    quiet_loading()  # loading bars would bury the paths this command prints
    try:
        engine = Engine(EngineConfig.from_settings(settings))
    except ValueError as error:  # a speed option this machine cannot run (FIREGEN_FP8 on a CPU, ...)
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    try:
        result = engine.generate(request)
    except errors.GenerationError as error:
        print(f"{error.error_type}: {error.message}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    names = file_names(args.name, len(result.files), result.files[0].extension)
    for name, output in zip(names, result.files):
        path = args.out / name
        path.write_bytes(output.data)
        print(path)
    print(f"seed {result.seed}")
    if result.video_info:
        print(f"video {result.video_info}")
    spent = result.timings
    print(
        f"seconds: load {spent.load_seconds:.2f}, generate {spent.generate_seconds:.2f}, "
        f"encode {spent.encode_seconds:.2f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
