"""`python -m generation.prefetch`: download the configured models into the Hugging Face cache ahead of time.

Run at image build time (Dockerfile, `BAKE_MODELS=1`) or once against a network volume, so that a worker's
cold start loads weights from disk and never waits on the hub. `tiny` and `none` need nothing; a local folder
is left as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .pipelines import DISABLED, TINY
from .settings import model_settings

# Only what `from_pretrained` reads for a diffusers pipeline folder: model_index.json at the root, and each
# component's configs, tokenizer files and safetensors weights in its subfolder (huggingface_hub's patterns
# let `*` cross `/`, so `*/...` means "below the root"). That leaves out the root-level single-file checkpoints
# (SDXL's sd_xl_base_1.0*.safetensors, several GB each), the fp16 duplicates the pipelines don't load, and
# other frameworks' formats.
ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
IGNORE = ["*.fp16.*", "*.bin", "*.ckpt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.pth"]


def needs_download(model_ref: str) -> bool:
    return model_ref.strip().lower() not in (TINY, DISABLED) and not Path(model_ref).exists()


def main() -> int:
    from huggingface_hub import snapshot_download

    settings = model_settings()  # the worker's own reading of IMAGE_MODEL / VIDEO_MODEL
    refs = [settings.image_model, settings.video_model]
    for ref in filter(needs_download, refs):
        print(f"prefetch: {ref}", flush=True)
        snapshot_download(ref, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
