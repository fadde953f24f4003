# The RunPod Serverless image: CUDA torch (never the CPU pin of the local .venv), the worker, and optionally
# the model weights baked in at build time.
#
#   docker build -t you/firegen-worker .                                  # weights baked in (default)
#   docker build --build-arg BAKE_MODELS=0 -t you/firegen-worker .        # weights from a network volume
#
# CMD runs `python -m listener`: the RunPod SDK's serverless loop plus the Firestore reconciler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Layers from the least to the most often changed, so that a code release pushes, and has RunPod's hosts pull,
# only its small top layers: the weights (tens of GB; a download that runs again still makes the same layer, as
# BuildKit keys a copy on file contents), the dependencies (the lock, pyproject.toml's list of them), the code. The
# project itself is not pip-installed: its code runs from /app (CMD's working directory).

# The list of requirements alone: the stages below key on it, not on the whole pyproject.toml.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml scripts/image_requirements.py /
RUN python /image_requirements.py /pyproject.toml > /requirements.txt

FROM ${PYTHON_IMAGE} AS deps
# cu128 wheels need a driver for CUDA 12.8 or newer: allow CUDA 12.8 and up on the RunPod endpoint (README).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
# constraints.txt is the one lock (the local .venv and CI use it too): the CUDA wheel of its torch version goes
# in first, from PyTorch's own index, then everything else at the lock's versions (its torch pin, 2.13.0, is
# satisfied by 2.13.0+cu128, so nothing replaces it). The fp8 extra (torchao) lets FIREGEN_FP8=on run. pip
# writes each module's bytecode as it installs: kept, so a cold start does not compile torch's and the others'.
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX}" "$(grep '^torch==' constraints.txt)"
COPY --from=requirements /requirements.txt ./
RUN pip install -c constraints.txt -r requirements.txt

FROM deps AS weights
ARG BAKE_MODELS=1
ARG IMAGE_MODEL=stabilityai/stable-diffusion-xl-base-1.0
ARG VIDEO_MODEL=Wan-AI/Wan2.1-T2V-1.3B-Diffusers
ENV HF_HOME=/models
WORKDIR /app
# What generation.prefetch imports, and nothing else (the worker's own reading of IMAGE_MODEL/VIDEO_MODEL and its
# file choice): a release that changes the rest of the code downloads no weights again.
COPY firegen_core/__init__.py firegen_core/redaction.py ./firegen_core/
COPY generation/__init__.py generation/models.py generation/settings.py generation/prefetch.py ./generation/
# A mistyped BAKE_MODELS (`true`) would bake nothing into an image that reads its weights offline: every job would
# fail ModelNotAvailable. hf_xet's chunk cache (/models/xet) is the download's, not the worker's. A gated or
# private model needs a Hugging Face token: a build secret (`--secret id=hf_token,env=HF_TOKEN`), which no layer or
# the image's history keeps, as a build arg's value would be; an empty one is no token.
RUN --mount=type=secret,id=hf_token \
    case "$BAKE_MODELS" in 0|1) ;; *) echo "BAKE_MODELS must be 0 or 1 (got $BAKE_MODELS)" >&2; exit 1;; esac \
 && mkdir -p /models \
 && if [ "$BAKE_MODELS" = "1" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" IMAGE_MODEL="$IMAGE_MODEL" VIDEO_MODEL="$VIDEO_MODEL" \
      python -m generation.prefetch && rm -rf /models/xet; fi

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
COPY --from=weights /models /models
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY firegen_core ./firegen_core
COPY generation ./generation
COPY listener ./listener
# handler.py and test_input.json: `python handler.py --test_input "$(cat test_input.json)"` inside the container.
COPY handler.py test_input.json ./
# The code's bytecode, written here once rather than by every cold start of a fresh container.
RUN /opt/venv/bin/python -m compileall -q firegen_core generation listener handler.py
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
