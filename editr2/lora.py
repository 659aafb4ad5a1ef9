"""A full fine-tune as a LoRA: the low-rank factors of each linear layer's weight change (truncated SVD).

A fine-tuned copy of a model costs as much as the model; its change is usually close to low-rank. `extract_lora`
writes the change of every linear layer as `B @ A` (the best rank-`rank` approximation in Frobenius norm) plus the
change of its bias, in the peft state-dict layout that diffusers' `load_lora_weights` reads (with `lora_alpha =
rank`, so the scale is 1). The report says how much of the change the adapter keeps: the fraction of the weight
change's energy (squared Frobenius norm) in the kept singular values, and the energy of the parameters it cannot
carry (changed norms or embeddings outside any linear layer).
"""

from __future__ import annotations

import torch

__all__ = ["extract_lora"]


def extract_lora(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], linear_layers: list[str],
                 rank: int, *, bias: bool = True, dtype: torch.dtype = torch.float16) -> tuple[dict, dict]:
    """The LoRA state dict that turns `base` into (approximately) `tuned`.

    Args:
        base (`dict[str, torch.Tensor]`): the original model's state dict.
        tuned (`dict[str, torch.Tensor]`): the fine-tuned model's state dict (same keys and shapes).
        linear_layers (`list[str]`): the module names of the linear layers (their weights are `NAME.weight`, shape
            `[out, in]`, and biases `NAME.bias`).
        rank (`int`): the adapter rank; a layer with fewer input or output features gets its full (exact) rank.
        bias (`bool`, defaults to True): also carry each layer's bias change (`NAME.lora_B.bias`, peft's
            `lora_bias`).
        dtype (`torch.dtype`, defaults to float16): the dtype of the returned factors (the SVD runs in float64).

    Returns:
        `(state_dict, report)`: `{"NAME.lora_A.weight": [r, in], "NAME.lora_B.weight": [out, r], "NAME.lora_B.bias":
        [out]}` and `{"rank", "rank_pattern" (layers below `rank`), "weight_energy_kept", "other_energy_dropped",
        "layers"}`; energies are fractions of the whole change's squared norm.
    """
    if rank < 1:
        raise ValueError(f"rank={rank}: pass at least 1.")
    if set(base) != set(tuned):
        missing = sorted(set(base) ^ set(tuned))[:5]
        raise ValueError(f"The two state dicts have different keys (e.g. {missing}): pass the same architecture.")
    for key in base:
        if base[key].shape != tuned[key].shape:
            raise ValueError(f"{key}: shape {tuple(base[key].shape)} vs {tuple(tuned[key].shape)}.")
    carried = set()
    state, rank_pattern = {}, {}
    kept = total = 0.0
    for name in linear_layers:
        weight = name + ".weight"
        if weight not in base:
            raise ValueError(f"{weight} is not in the state dict: pass the linear layers' module names.")
        delta = tuned[weight].double() - base[weight].double()  # [out, in]
        if not torch.isfinite(delta).all():
            raise ValueError(f"{weight}: the fine-tuned weights are not finite.")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # u [out, k], s [k], vh [k, in]
        r = min(rank, s.numel())
        if r < rank:
            rank_pattern[name] = r
        root = s[:r].sqrt()
        state[f"{name}.lora_A.weight"] = (root[:, None] * vh[:r]).to(dtype).contiguous()  # [r, in]
        state[f"{name}.lora_B.weight"] = (u[:, :r] * root[None, :]).to(dtype).contiguous()  # [out, r]
        energy = s.pow(2)
        kept += float(energy[:r].sum())
        total += float(energy.sum())
        carried.add(weight)
        if bias and name + ".bias" in base:
            change = tuned[name + ".bias"].double() - base[name + ".bias"].double()
            state[f"{name}.lora_B.bias"] = change.to(dtype)
            kept += float(change.pow(2).sum())
            total += float(change.pow(2).sum())
            carried.add(name + ".bias")
    dropped = sum(float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in base if k not in carried)
    whole = total + dropped
    report = {"rank": rank, "rank_pattern": rank_pattern, "layers": len(linear_layers),
              "weight_energy_kept": kept / whole if whole else 1.0,
              "other_energy_dropped": dropped / whole if whole else 0.0}
    return state, report
