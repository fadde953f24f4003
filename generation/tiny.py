"""Tiny random-weight SDXL and Wan 2.1 pipelines, built in code and saved where `from_pretrained` can load them.

No model hub is reachable in CI, yet the worker should run the same code path as in production: the real
pipeline classes, the real `from_pretrained`, the real downsampling factors (SDXL VAE 8x; Wan VAE 8x spatial and
4x temporal) so that latent shapes, frame counts and timings scale like the real models. Only the widths and
depths are tiny, which keeps 512x512 at 20 steps around a second on a laptop CPU.

A built folder is cached (`~/.cache/firegen/tiny/{sdxl,wan}`, or under `FIREGEN_CACHE`) and stamped with
`VERSION`, so a change to the architectures here rebuilds it. Builds go to a temp folder renamed into place:
a concurrent process sees either no folder or a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

VERSION = 1
KINDS = ("sdxl", "wan")
STAMP = "firegen-tiny.json"
BUILD_SEED = 0
# Builds seed torch's global RNG: two threads building at once would interleave their draws.
_BUILD_LOCK = threading.Lock()

# CLIP's context length; SDXL pads every prompt to it.
CLIP_MAX_LENGTH = 77
# Wan pads prompts to 512 T5 tokens (WanPipeline's max_sequence_length default).
T5_MAX_LENGTH = 512


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where tiny pipelines live: the argument, else `$FIREGEN_CACHE`, else `~/.cache/firegen`."""
    root = cache_dir or os.environ.get("FIREGEN_CACHE") or Path.home() / ".cache" / "firegen"
    return Path(root).expanduser() / "tiny"


# --- tokenizers -------------------------------------------------------------------------------------------


def _clip_tokenizer():
    """A byte-level BPE CLIP tokenizer with no merges: every byte is a token, alone or ending a word."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + symbols + [s + "</w>" for s in symbols]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    """A Unigram T5 tokenizer over printable ASCII, with and without the word-start marker."""
    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# --- SDXL -------------------------------------------------------------------------------------------------


def _clip_config(vocab_size: int, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def build_sdxl():
    """StableDiffusionXLPipeline with SDXL's structure: 3-level UNet, 4-level VAE, two CLIP encoders."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    text_dims = (16, 32)  # SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG), concatenated for cross attention
    projection_dim = 32
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=sum(text_dims),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + 6 micro-conditioning numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    # SDXL base's scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_clip_config(tokenizer.vocab_size, text_dims[0])),
        text_encoder_2=CLIPTextModelWithProjection(
            _clip_config(tokenizer.vocab_size, text_dims[1], projection_dim=projection_dim)
        ),
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


# --- Wan 2.1 ----------------------------------------------------------------------------------------------


def build_wan():
    """WanPipeline with Wan 2.1's structure: UMT5 encoder, 3D transformer, causal VAE (8x, 4x in time)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    text_dim = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        # One head and one block: at 512x512x17 there are 5120 tokens and attention is nearly all the cost.
        num_attention_heads=1,
        attention_head_dim=12,  # split by the 3D rotary embedding into time, height and width parts
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    # Wan's own channel multipliers on a base of 1: the full-resolution decoder layers dominate CPU time (one
    # channel there also takes PyTorch's fast path for the RMS norm), so 17 frames at 512x512 decode in ~1 s.
    vae = AutoencoderKLWan(
        base_dim=1,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
    )
    # Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC on flow-matching sigmas.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


BUILDERS: dict[str, Callable] = {"sdxl": build_sdxl, "wan": build_wan}


# --- the cache --------------------------------------------------------------------------------------------


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def _build_into(kind: str, folder: Path) -> None:
    import torch

    # Fixed seed so every process builds the same weights; fork_rng leaves the caller's RNG untouched.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        pipeline = BUILDERS[kind]()
    pipeline.save_pretrained(folder)
    (folder / STAMP).write_text(json.dumps({"kind": kind, "version": VERSION}))


def ensure(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny `kind` pipeline ('sdxl' or 'wan'), building it first if needed."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {KINDS}")
    target = cache_root(cache_dir) / kind
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users (an image built as root)
    try:
        _build_into(kind, staging)
        if target.exists() and not _is_current(target):
            # Stale version: move it aside first (rename is atomic; rmtree is not).
            trash = Path(tempfile.mkdtemp(prefix=f".{kind}-old-", dir=target.parent))
            os.replace(target, trash / kind)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_current(target):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
