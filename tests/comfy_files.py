"""Tiny Qwen-Image-Edit single files in ComfyUI's key layout, and a config folder for them (for the loader tests).

What ComfyUI users have, at tiny widths: a transformer file (diffusers' names under `model.diffusion_model.`; the
2511 one with ComfyUI's `__index_timestep_zero__` marker), a Qwen2.5-VL file in the original checkpoint layout
(`model.layers.*`, `visual.*`, optionally `lm_head.weight`), and a VAE in the original Wan 2.1 layout. The VAE has
the real VAE's topology (4 levels, 2 res-blocks each) at tiny width, since the Wan key conversion follows it.
"""

from __future__ import annotations

import json
import pathlib
import re

import torch
from safetensors.torch import save_file

from diffusers_editr2.testing import _write_tokenizer_files, tiny_components

TRANSFORMER_PREFIX = "model.diffusion_model."


def tiny_real_topology_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0],
        ).eval()  # fmt: skip


_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}  # fmt: skip


def _resnet_part(rest: str) -> str:
    for ours, theirs in _RESNET.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest


def vae_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`AutoencoderKLQwenImage` names -> the original Wan 2.1 VAE layout (the inverse of diffusers'
    `convert_wan_vae_to_diffusers` for the real topology)."""
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
             "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
             "decoder.norm_out": "decoder.head.0", "encoder.conv_out": "encoder.head.2",
             "decoder.conv_out": "decoder.head.2"}  # fmt: skip
    out = {}
    for key, tensor in state_dict.items():
        new = None
        for ours, theirs in fixed.items():
            if key.startswith(ours + "."):
                new = theirs + key[len(ours):]
        if new is None and (m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key)):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_part(m[3])}"
        elif new is None and (m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif new is None and (m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)):
            new = f"encoder.downsamples.{m[1]}.{_resnet_part(m[2])}"
        elif new is None and (m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet_part(m[3])}"
        elif new is None and (m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        out[new or key] = tensor
    return out


def text_encoder_to_comfy(state_dict: dict[str, torch.Tensor], lm_head: bool = True) -> dict[str, torch.Tensor]:
    """transformers 5 Qwen2.5-VL names -> the original checkpoint layout ComfyUI's files use."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and not lm_head:
            continue
        key = re.sub(r"^model\.visual\.", "visual.", key)
        key = re.sub(r"^model\.language_model\.", "model.", key)
        out[key] = tensor
    return out


def write_config_folder(directory: pathlib.Path, components: dict, vae) -> pathlib.Path:
    """A config folder for the tiny files: the component configs and the tokenizer (no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    components["transformer"].save_config(directory / "transformer")
    vae.save_config(directory / "vae")
    components["scheduler"].save_config(directory / "scheduler")
    text_encoder = components["text_encoder"]
    text_encoder.config.save_pretrained(directory / "text_encoder")
    text_encoder.generation_config.save_pretrained(directory / "text_encoder")
    _write_tokenizer_files(components["tokenizer"], directory / "tokenizer", with_tokenizer_json=False)
    image_config = components["processor"].image_processor.to_dict()
    (directory / "processor").mkdir(exist_ok=True)
    (directory / "processor" / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
    return directory


def write_single_files(models_dir: pathlib.Path, variant: str = "2509", lm_head: bool = True, seed: int = 0,
                       config_name: str = "tiny-qwen-image-edit") -> dict:
    """Writes tiny single files into `models_dir`'s diffusion_models/, text_encoders/ and vae/, and their config
    folder into models/editr2/configs/<config_name>; returns the file names, the config name and the components
    (as an `EditR2Pipeline` would hold them, the VAE the real-topology one)."""
    components = tiny_components(seed)  # 2509 config: the 2511 file says what it is by its marker key
    components["vae"] = vae = tiny_real_topology_vae(seed)
    names = {"diffusion_model": f"tiny_qwen_image_edit_{variant}_bf16.safetensors",
             "text_encoder": f"tiny_qwen_2.5_vl{'' if lm_head else '_no_head'}.safetensors",
             "vae": "tiny_qwen_image_vae.safetensors"}  # fmt: skip
    transformer = {TRANSFORMER_PREFIX + k: v.contiguous() for k, v in components["transformer"].state_dict().items()}
    if variant == "2511":
        transformer[TRANSFORMER_PREFIX + "__index_timestep_zero__"] = torch.tensor([])
    text_encoder = text_encoder_to_comfy(components["text_encoder"].state_dict(), lm_head)
    files = {"diffusion_models": (names["diffusion_model"], transformer),
             "text_encoders": (names["text_encoder"], {k: v.contiguous() for k, v in text_encoder.items()}),
             "vae": (names["vae"], {k: v.contiguous() for k, v in vae_to_comfy(vae.state_dict()).items()})}
    for folder, (name, tensors) in files.items():
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(models_dir / folder / name))
    write_config_folder(models_dir / "editr2" / "configs" / config_name, components, vae)
    return {"names": names, "config": config_name, "components": components}


def write_trainer_lora(folder: pathlib.Path, seed: int = 0) -> None:
    """An EditR2Trainer output folder: a transformer LoRA (diffusers' format) and a reasoning LoRA (peft's)."""
    from peft import LoraConfig

    from diffusers_editr2.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
                                                init_lora_weights="gaussian"))
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights="gaussian"), adapter_name="reasoning")
        for module, std in ((pipe.transformer, 0.5), (pipe.text_encoder, 2.0)):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=std)
    pipe.save_transformer_lora(str(folder))
    pipe.save_reasoning_lora(str(folder / "reasoning_lora"))
