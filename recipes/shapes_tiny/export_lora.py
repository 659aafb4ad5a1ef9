"""Ship a fine-tuned editor as a transformer LoRA over the model it was fine-tuned from (`editr2.lora.extract_lora`).

    python -m recipes.shapes_tiny.export_lora --base checkpoints/editr2-shapes-tiny-sft \
        --editor runs/editor_sft_none --rank 64 --out checkpoints/editr2-shapes-tiny-none-lora

The trained baselines (`configs/editor_carried_{none,history}.yaml`) are full fine-tunes of the SFT editor; a full
copy each would double the checkpoint. The adapter is the rank-`rank` truncated SVD of each linear layer's change plus
its bias change, saved in diffusers' format (`pytorch_lora_weights.safetensors`, loaded with
`pipe.load_lora_weights(out)`, `editr2 edit --lora`, `editr2 bench shapes --lora`). `lora_report.json` records the
energy of the change the adapter keeps and, on a probe batch, how far the adapter's velocity is from the full
fine-tune's, relative to how far the fine-tune moved it: `velocity_error = |v_lora - v_tuned| / |v_tuned - v_base|`.
The run's `prompt_mode` says which `reasoning` the adapter is for; the model card says it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from editr2.lora import extract_lora

LORA_FILE = "pytorch_lora_weights.safetensors"


def linear_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@torch.no_grad()
def velocity_error(base, tuned, adapted, seed: int = 0, batch: int = 4, tokens: int = 64, text: int = 24) -> float:
    """|v_adapted - v_tuned| / |v_tuned - v_base| on one random probe batch (noisy target + reference tokens, text
    states, a mid-schedule timestep): how much of the fine-tune's effect on the output the adapter misses."""
    config = base.config
    g = torch.Generator().manual_seed(seed)
    side = int((tokens // 2) ** 0.5)
    hidden = torch.randn(batch, 2 * side * side, config.in_channels, generator=g)  # [B, target + reference, C]
    states = torch.randn(batch, text, config.joint_attention_dim, generator=g)  # [B, L, D_text]
    inputs = dict(hidden_states=hidden, encoder_hidden_states=states,
                  encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
                  timestep=torch.full((batch,), 0.5), img_shapes=[[(1, side, side), (1, side, side)]] * batch,
                  return_dict=False)
    v_base, v_tuned, v_adapted = (m(**inputs)[0] for m in (base, tuned, adapted))
    return float((v_adapted - v_tuned).norm() / (v_tuned - v_base).norm().clamp_min(1e-12))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the default model folder (its transformer/ is the base)")
    parser.add_argument("--editor", required=True, help="a train_editor run folder (its transformer/ and config.json)")
    parser.add_argument("--rank", type=int, default=64, help="adapter rank (default 64)")
    parser.add_argument("--out", required=True, help="folder for the adapter, its report and model card")
    args = parser.parse_args(argv)

    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    from diffusers_editr2 import EditR2Pipeline

    base_dir, run = Path(args.base), Path(args.editor)
    for path in (base_dir / "transformer", run / "transformer"):
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: no transformer there (a model folder and a finished train_editor run).")
    base = QwenImageTransformer2DModel.from_pretrained(base_dir / "transformer").float().eval()
    tuned = QwenImageTransformer2DModel.from_pretrained(run / "transformer").float().eval()
    names = linear_layers(base)
    state, report = extract_lora(base.state_dict(), tuned.state_dict(), names, args.rank)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names, lora_bias=True,
                        rank_pattern=report["rank_pattern"], alpha_pattern=report["rank_pattern"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    EditR2Pipeline.save_lora_weights(out, transformer_lora_layers=state, weight_name=LORA_FILE,
                                     transformer_lora_adapter_metadata=config.to_dict())

    # Reload through diffusers' loader, as users will, and measure what the adapter misses.
    adapted = QwenImageTransformer2DModel.from_pretrained(base_dir / "transformer").float().eval()
    adapted.load_lora_adapter(out / LORA_FILE, prefix="transformer", adapter_name="baseline")
    report["velocity_error"] = velocity_error(base, tuned, adapted)
    run_config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    report.update(source_run=str(run), prompt_mode=run_config.get("prompt_mode", "intent"),
                  bytes=(out / LORA_FILE).stat().st_size)
    (out / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    mode = report["prompt_mode"]
    (out / "README.md").write_text(
        f"# {base_dir.name}, `{mode}` editor (LoRA)\n\n"
        f"The {base_dir.name} editor fine-tuned with `prompt_mode: {mode}` (run folder `{run.as_posix()}`, whose `config.json` "
        f"holds every setting), shipped as a rank-{args.rank} transformer LoRA over `{base_dir.as_posix()}`. "
        f"Run it with `reasoning=\"{mode}\"`:\n\n```python\npipe = EditR2Pipeline.from_pretrained(\"{base_dir.as_posix()}\")\n"
        f"pipe.load_lora_weights(\"{out.as_posix()}\")\nout = pipe(image, prompt, reasoning=\"{mode}\")\n```\n\n"
        f"`editr2 bench shapes --model {base_dir.as_posix()} --lora {out.as_posix()} --reasoning {mode}`.\n\n"
        f"Extraction: {report['weight_energy_kept']:.3f} of the fine-tune's change (squared norm) kept, "
        f"{report['other_energy_dropped']:.4f} in parameters outside linear layers dropped; velocity error "
        f"{report['velocity_error']:.3f} of the fine-tune's effect on a probe batch (`lora_report.json`).\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
