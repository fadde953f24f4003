# The RunPod Serverless image: CUDA torch (never the CPU pin of the local .venv), the worker, and optionally
# the model weights baked in at build time.
#
#   docker build -t you/firegen-worker .                                  # weights baked in (default)
#   docker build --build-arg BAKE_MODELS=0 -t you/firegen-worker .        # weights from a network volume
#
# CMD runs `python -m listener`: the RunPod SDK's serverless loop plus the Firestore reconciler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cu128 wheels need a driver for CUDA 12.8 or newer: allow CUDA 12.8 and up on the RunPod endpoint (README).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# constraints.txt is the one lock (the local .venv and CI use it too): the CUDA wheel of its torch version goes
# in first, from PyTorch's own index, then everything else at the lock's versions (its torch pin, 2.13.0, is
# satisfied by 2.13.0+cu128, so nothing replaces it). The fp8 extra (torchao) lets FIREGEN_FP8=on run.
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX}" "$(grep '^torch==' constraints.txt)"
COPY pyproject.toml README.md LICENSE ./
COPY firegen_core ./firegen_core
COPY generation ./generation
COPY listener ./listener
RUN pip install -c constraints.txt ".[fp8]" \
 && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

FROM build AS weights
ARG BAKE_MODELS=1
ARG IMAGE_MODEL=stabilityai/stable-diffusion-xl-base-1.0
ARG VIDEO_MODEL=Wan-AI/Wan2.1-T2V-1.3B-Diffusers
ENV HF_HOME=/models
RUN mkdir -p /models && if [ "$BAKE_MODELS" = "1" ]; then \
      IMAGE_MODEL="$IMAGE_MODEL" VIDEO_MODEL="$VIDEO_MODEL" python -m generation.prefetch; fi

FROM ${PYTHON_IMAGE}
ARG IMAGE_MODEL=stabilityai/stable-diffusion-xl-base-1.0
ARG VIDEO_MODEL=Wan-AI/Wan2.1-T2V-1.3B-Diffusers
# torch.compile (FIREGEN_COMPILE=auto, on by default on CUDA) builds Triton's launcher with a C compiler at run
# time; the slim image has none, and without it every compile fails and the worker stays eager. Debian's
# packages of the base image's release: their versions move with its security updates, hence unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=weights /models /models
WORKDIR /app
COPY firegen_core ./firegen_core
COPY generation ./generation
COPY listener ./listener
# Baked weights are read offline: a cold start never waits on the hub. With BAKE_MODELS=0, point HF_HOME at a
# network volume (e.g. /runpod-volume/hf) and set HF_HUB_OFFLINE=0 for a first download there.
# Expandable segments: on an H100 the Wan run peaked at 20.6 GiB allocated but 29.7 GiB reserved (bench/gpu.py):
# the caching allocator's fragmentation, not the models, is what would not fit a 24 GB card.
# FIREGEN_DEVICE=cuda: the GPU image refuses to start where torch sees no card (a host driver older than the
# image's CUDA), so RunPod starts the worker elsewhere; left to "CUDA if present", it would run on the CPU and take
# jobs from the shared queue for most of an hour each. FIREGEN_DEVICE=cpu runs it on a CPU on purpose.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FIREGEN_DEVICE=cuda \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    HF_HOME=/models \
    HF_HUB_OFFLINE=1 \
    IMAGE_MODEL=${IMAGE_MODEL} \
    VIDEO_MODEL=${VIDEO_MODEL}
CMD ["python", "-m", "listener"]
