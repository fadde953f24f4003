"""The models the worker knows by name, as plain data: all that `generation.prefetch` needs of the worker's code
besides its settings. The image's weights stage copies this module, `settings.py` and `prefetch.py` alone (and
what they import), so that a release changing the rest of the code never downloads the weights again."""

TINY = "tiny"  # the built-in random-weight pipelines (`generation.tiny`)
DISABLED = "none"  # no model for that media type

IMAGE_MODEL_DEFAULT = "stabilityai/stable-diffusion-xl-base-1.0"
VIDEO_MODEL_DEFAULT = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# The half-precision files a model publishes beside its full ones (`*.fp16.safetensors`): SDXL's, which the image
# bakes instead (half the bytes to read at a cold start). Wan's repo publishes none.
IMAGE_HALF_VARIANT: str | None = "fp16"
VIDEO_HALF_VARIANT: str | None = None
