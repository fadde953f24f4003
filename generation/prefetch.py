"""`python -m generation.prefetch`: download the configured models into the Hugging Face cache ahead of time.

Run at image build time (Dockerfile, `BAKE_MODELS=1`) or once against a network volume, so that a worker's
cold start loads weights from disk and never waits on the hub. `tiny` and `none` need nothing; a local folder
is left as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .models import DISABLED, IMAGE_HALF_VARIANT, TINY, VIDEO_HALF_VARIANT
from .settings import model_settings

# Only what `from_pretrained` reads for a diffusers pipeline folder: model_index.json at the root, and each
# component's configs, tokenizer files and safetensors weights in its subfolder (huggingface_hub's patterns
# let `*` cross `/`, so `*/...` means "below the root"). That leaves out the root-level single-file checkpoints
# (SDXL's sd_xl_base_1.0*.safetensors, several GB each), the half-precision duplicates of a full download, and
# other frameworks' formats. SDXL's fp16 files are taken instead of its full-precision ones (`select`): the
# worker loads them in half precision (generation.image.ImagePipeline.weights_variant), from half the bytes.
ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
IGNORE = ["*.fp16.*", "*.bin", "*.ckpt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.pth"]


def select(files: list[str], variant: str | None = None) -> list[str]:
    """The files of a repo listing to download: the pipeline folder (ALLOW/IGNORE), and with `variant` each
    weights file's `.{variant}.safetensors` twin instead of it where the repo publishes one."""
    from huggingface_hub.utils import filter_repo_objects

    listed = set(files)
    chosen = []
    for name in filter_repo_objects(sorted(listed), allow_patterns=ALLOW, ignore_patterns=IGNORE):
        twin = name.removesuffix(".safetensors") + f".{variant}.safetensors" if variant else None
        chosen.append(twin if twin and name.endswith(".safetensors") and twin in listed else name)
    return chosen


def needs_download(model_ref: str) -> bool:
    return model_ref.strip().lower() not in (TINY, DISABLED) and not Path(model_ref).exists()


def main() -> int:
    from huggingface_hub import HfApi, snapshot_download

    settings = model_settings()  # the worker's own reading of IMAGE_MODEL / VIDEO_MODEL
    models = [(settings.image_model, IMAGE_HALF_VARIANT), (settings.video_model, VIDEO_HALF_VARIANT)]
    for ref, variant in models:
        if needs_download(ref):
            files = select(HfApi().list_repo_files(ref), variant)
            print(f"prefetch: {ref} ({len(files)} files{', ' + variant if variant else ''})", flush=True)
            snapshot_download(ref, allow_patterns=files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
