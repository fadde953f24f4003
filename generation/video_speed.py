"""Wan 2.1's speed options: the attention backend, step caching, and a cheap text-encoder offload.

- `attention_backend(requested, device)`: the diffusers attention-dispatcher backend Wan's transformer uses.
  `auto` takes the fastest one installed for the card: FlashAttention 3 (`_flash_3`, Hopper, the
  `flash_attn_interface` package), then FlashAttention 2 (`flash`, `flash_attn`), else torch's SDPA (`native`,
  which picks its own flash or memory-efficient kernel). Off CUDA: `native`.
- `apply_step_cache(transformer, threshold)`: diffusers' First Block Cache (a step whose first block's residual
  changed less than `threshold` reuses the cached output of the other blocks). Lossy, opt-in
  (FIREGEN_VIDEO_CACHE=firstblock); bench/gpu.py records its speed-up and PSNR against the full run.
- `PinnedSwap`: the text encoder lives in pinned CPU memory and is copied to the GPU whole, with non-blocking
  copies, when the pipeline first runs it for a video, then dropped from the GPU when the transformer starts:
  one ~11 GiB host-to-device copy per video (prompt and negative prompt share it), instead of diffusers' block
  by block streaming, which measured 18.9 s per video on an H100 (README). The GPU holds the whole encoder while
  it encodes (SDXL + Wan + UMT5 ~ 20.5 GiB of weights), none of it while the transformer runs.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging

from firegen_core.redaction import got

log = logging.getLogger(__name__)

ATTENTION_SETTING = "FIREGEN_ATTENTION_BACKEND"
NATIVE = "native"
# (backend, package it needs, minimum compute capability), fastest first.
_AUTO_ORDER = (("_flash_3", "flash_attn_interface", (9, 0)), ("flash", "flash_attn", (8, 0)))
VIDEO_CACHE_MODES = ("off", "firstblock")
DEFAULT_CACHE_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default


def attention_backend(requested: str, device: str) -> str:
    """The backend to set for `requested` (`auto` or a name of diffusers' AttentionBackendName). ValueError, one
    line naming the setting, for a name diffusers doesn't know."""
    requested = requested.strip().lower()
    if requested != "auto":
        # Here only: importing diffusers costs a worker that loads no model ~4 s of CPU (torch's compiler with it).
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = {name.value for name in AttentionBackendName}
        if requested not in known:
            raise ValueError(f"{ATTENTION_SETTING} must be auto or one of {', '.join(sorted(known))} {got(requested)}")
        return requested
    if not device.startswith("cuda"):
        return NATIVE
    import torch

    capability = torch.cuda.get_device_capability(device)
    for backend, package, minimum in _AUTO_ORDER:
        if capability >= minimum and importlib.util.find_spec(package) is not None:
            return backend
    return NATIVE


def set_attention_backend(model, backend: str) -> None:
    """Note: diffusers also makes `backend` its process-wide active backend (every dispatcher user without a
    backend of its own); SDXL's UNet processors call torch's SDPA directly, so only Wan is concerned."""
    if backend != NATIVE:  # native is diffusers' default: nothing to set (and no "experimental" warning)
        model.set_attention_backend(backend)


def parse_video_cache(mode: str | None, threshold: str | None) -> float | None:
    """FIREGEN_VIDEO_CACHE and FIREGEN_VIDEO_CACHE_THRESHOLD: the First Block Cache threshold, or None (off)."""
    mode = (mode or "off").strip().lower()
    if mode in ("0", "false", "no"):  # the words every on/off setting takes for off
        mode = "off"
    if mode not in VIDEO_CACHE_MODES:
        raise ValueError(f"FIREGEN_VIDEO_CACHE must be one of {', '.join(VIDEO_CACHE_MODES)} {got(mode)}")
    try:  # checked with the cache off too: a wrong value is said at start-up, not when the cache is turned on
        value = float(threshold) if threshold else DEFAULT_CACHE_THRESHOLD
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise ValueError(
            f"FIREGEN_VIDEO_CACHE_THRESHOLD must be a number greater than 0 and less than 1 {got(threshold)}"
        )
    return None if mode == "off" else value


def apply_step_cache(transformer, threshold: float) -> bool:
    """False, saying so, where the transformer has a single block: First Block Cache needs the first one and the
    rest (diffusers' hook failed "pop from empty list", and the video model did not load: the tiny one of
    `make dev`, an audit)."""
    from diffusers.hooks import FirstBlockCacheConfig

    blocks = len(getattr(transformer, "blocks", ()))
    if blocks < 2:
        reason = f"the transformer has {blocks} block; First Block Cache needs 2 or more"
        log.warning("video_cache_skipped", extra={"reason": reason})
        return False
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return True


def reset_step_cache(transformer) -> None:
    """Forget the step outputs the cache holds from the last video. diffusers resets it at the end of a pipeline
    call, on components with `_reset_stateful_cache`, which the CfgBatched wrapper lacked: the next video reused the
    last one's blocks (another size failed "The size of tensor a (120) must match..."), and a video stopped or
    failed mid-way never reaches that end."""
    inner = denoiser(transformer)
    if getattr(inner, "is_cache_enabled", False):
        inner._reset_stateful_cache()


class PinnedSwap:
    """Keep `module` in (pinned, on CUDA) CPU memory; copy it whole to `device` before its first forward, and
    back (the GPU copy is simply dropped) on `offload()`. The CPU copies are kept, so offloading costs nothing."""

    def __init__(self, module, device: str):
        self.module, self.device = module, device
        module.to("cpu")
        pin = device.startswith("cuda")
        self.tensors = list(itertools.chain(module.parameters(), module.buffers()))
        for tensor in self.tensors:
            if pin:
                tensor.data = tensor.data.pin_memory()
        self.host = [tensor.data for tensor in self.tensors]
        self.on_device = False
        self.swaps = 0
        module.register_forward_pre_hook(self._onload)

    def _onload(self, _module, _args) -> None:
        if self.on_device:
            return
        for tensor, host in zip(self.tensors, self.host):
            # Non-blocking from pinned memory: the copies queue on the current stream ahead of the encoder's
            # kernels, so nothing waits for them on the CPU side.
            tensor.data = host.to(self.device, non_blocking=True)
        self.on_device = True
        self.swaps += 1

    def offload(self) -> None:
        """Back to the CPU copies."""
        if not self.on_device:
            return
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host  # the device copy is freed once its last kernel ran (stream-ordered allocator)
        self.on_device = False


def swap_text_encoder(pipe, device: str) -> PinnedSwap:
    """The PinnedSwap of `pipe.text_encoder`, offloaded as soon as `pipe.encode_prompt` returns (it encodes the
    prompt and the negative prompt: one copy serves both). Not a hook on the transformer: that may be compiled,
    and a hook moving weights must stay outside the graph."""
    swap = PinnedSwap(pipe.text_encoder, device)
    encode = pipe.encode_prompt

    def encode_then_offload(*args, **kwargs):
        try:
            return encode(*args, **kwargs)
        finally:
            swap.offload()

    pipe.encode_prompt = encode_then_offload
    return swap


@functools.cache
def _cfg_batched_class():
    """The wrapper class, defined on first use: torch is imported when a model loads, not with this module."""
    import torch

    class CfgBatched(torch.nn.Module):
        """Wan's transformer running each step's conditional and unconditional passes as one batch of 2.

        WanPipeline calls its transformer twice a step, on the same latents: with the prompt's embeddings, then with
        the negative prompt's. With `negative` set (`batch_cfg` captures it from encode_prompt), the first call
        runs both as one batch and keeps the unconditional half for the second call, which returns it without running
        anything: one kernel launch sequence on twice the data instead of two, as Wan's own code batches CFG. The
        wrapped module (`inner`) is the one compiled, quantized and cached; this wrapper stays outside the graph.
        """

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.negative = None  # the negative prompt's embeddings of the current call; None: no batching
            self.batching = True  # False: two passes (the leaner out-of-memory retry)
            self._pending: tuple | None = None  # (latents of the conditional call, unconditional output)

        # What WanPipeline reads from its transformer.
        @property
        def config(self):
            return self.inner.config

        @property
        def dtype(self):
            return self.inner.dtype

        @property
        def device(self):
            return self.inner.device

        def cache_context(self, name: str, **kwargs):
            return self.inner.cache_context(name, **kwargs)

        def _reset_stateful_cache(self, recurse: bool = True) -> None:
            """What diffusers calls at the end of a pipeline call (the step cache's cached tensors go)."""
            reset_step_cache(self.inner)

        def forward(self, hidden_states, timestep, encoder_hidden_states, attention_kwargs=None, return_dict=False):
            import torch

            pending, self._pending = self._pending, None
            if pending is not None and pending[0] is hidden_states:
                return (pending[1],)  # the unconditional pass, computed with the conditional one
            if self.negative is None or not self.batching:
                return self.inner(
                    hidden_states=hidden_states,
                    timestep=timestep,
                    encoder_hidden_states=encoder_hidden_states,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                )
            negative = self.negative.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            both = self.inner(
                hidden_states=torch.cat([hidden_states, hidden_states]),
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([encoder_hidden_states, negative]),
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
            conditional, unconditional = both.chunk(2)
            self._pending = (hidden_states, unconditional)
            return (conditional,)

    return CfgBatched


def cfg_batched(transformer):
    """`transformer` wrapped so that each step's two passes run as one batch (see CfgBatched's docstring)."""
    return _cfg_batched_class()(transformer)


def denoiser(transformer):
    """The transformer itself, inside a CfgBatched wrapper or not."""
    return transformer.inner if is_cfg_batched(transformer) else transformer


def is_cfg_batched(transformer) -> bool:
    return type(transformer).__name__ == "CfgBatched" and type(transformer).__module__ == __name__


def batch_cfg(pipe) -> None:
    """Wrap `pipe.transformer` in CfgBatched and hand it each call's negative embeddings as the pipeline encodes
    them (the pipeline keeps them in a local variable)."""
    pipe.transformer = cfg_batched(pipe.transformer)
    encode = pipe.encode_prompt

    def encode_and_keep_negative(*args, **kwargs):
        embeds, negative = encode(*args, **kwargs)
        if is_cfg_batched(pipe.transformer):  # looked up per call: a compiled swap installs a new wrapper
            pipe.transformer.negative = negative
        return embeds, negative

    pipe.encode_prompt = encode_and_keep_negative
