"""What the image build downloads: a pipeline folder's parts, never the big single-file checkpoints."""

import shutil

import pytest
from huggingface_hub.utils import filter_repo_objects

from generation import tiny
from generation.capability import Runtime
from generation.image import ImagePipeline
from generation.prefetch import ALLOW, IGNORE, needs_download, select

SDXL_REPO = [
    "model_index.json",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/openvino_model.bin",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/flax_model.msgpack",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
WAN_REPO = [
    "model_index.json",
    "text_encoder/model-00001-of-00005.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/config.json",
]


def kept(files):
    return sorted(filter_repo_objects(files, allow_patterns=ALLOW, ignore_patterns=IGNORE))


def test_sdxl_keeps_the_pipeline_folder_only():
    assert kept(SDXL_REPO) == sorted(
        [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )


def test_wan_keeps_everything_it_loads():
    assert kept(WAN_REPO) == sorted(WAN_REPO)


def test_tiny_none_and_local_folders_need_no_download(tmp_path):
    assert not needs_download("tiny") and not needs_download("none") and not needs_download(str(tmp_path))
    assert needs_download("stabilityai/stable-diffusion-xl-base-1.0")


def test_sdxl_is_baked_as_its_fp16_files():
    """The build takes each published fp16 twin instead of the full-precision file (half the bytes)."""
    assert sorted(select(SDXL_REPO, "fp16")) == sorted(
        [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.fp16.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
            "vae/diffusion_pytorch_model.safetensors",  # no fp16 twin in this listing: the full file
        ]
    )
    assert select(WAN_REPO, None) == kept(WAN_REPO)


@pytest.fixture(scope="module")
def fp16_sdxl(tmp_path_factory):
    """A tiny SDXL saved as the fp16 variant only, as the image bakes it (`save_pretrained(variant=...)` writes
    the same `*.fp16.safetensors` names the hub publishes)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("fp16")
    source = tiny.ensure("sdxl", root / "cache")
    StableDiffusionXLPipeline.from_pretrained(str(source), dtype=torch.float16).save_pretrained(
        root / "sdxl", variant="fp16"
    )
    return root / "sdxl"


def test_baked_fp16_sdxl_loads_in_half_precision(fp16_sdxl):
    assert not (fp16_sdxl / "unet" / "diffusion_pytorch_model.safetensors").exists()
    half = Runtime(device="cpu", dtype="bfloat16")
    assert ImagePipeline.weights_variant(str(fp16_sdxl), half) == "fp16"
    capability = ImagePipeline.load(str(fp16_sdxl), half)
    assert capability.pipe.unet.dtype == capability.pipe.text_encoder.dtype == half.torch_dtype


def test_the_variant_is_chosen_from_what_is_on_disk(fp16_sdxl, tmp_path, monkeypatch):
    full_and_half = tmp_path / "both"
    shutil.copytree(fp16_sdxl, full_and_half)
    shutil.copy(
        full_and_half / "unet/diffusion_pytorch_model.fp16.safetensors",
        full_and_half / "unet/diffusion_pytorch_model.safetensors",
    )
    half, full = Runtime(device="cpu", dtype="float16"), Runtime(device="cpu", dtype="float32")
    assert ImagePipeline.weights_variant(str(full_and_half), half) == "fp16"
    assert ImagePipeline.weights_variant(str(full_and_half), full) is None  # full precision from the full files
    assert ImagePipeline.weights_variant(str(fp16_sdxl), full) == "fp16"  # the only files there
    assert ImagePipeline.weights_variant(str(tiny.ensure("sdxl", tmp_path / "c")), half) is None  # no fp16 files
    # A hub id, read from the Hugging Face cache the image bakes (HF_HOME=/models): laid out as the hub's client does.
    cache = tmp_path / "hub"
    snapshot = cache / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / ("0" * 40)
    shutil.copytree(fp16_sdxl, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert ImagePipeline.weights_variant("stabilityai/stable-diffusion-xl-base-1.0", half) == "fp16"
    assert ImagePipeline.weights_variant("someone/other-model", half) is None
