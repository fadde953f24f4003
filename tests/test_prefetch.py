"""What the image build downloads: a pipeline folder's parts, never the big single-file checkpoints."""

from huggingface_hub.utils import filter_repo_objects

from generation.prefetch import ALLOW, IGNORE, needs_download

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
