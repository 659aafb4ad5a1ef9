"""Memory and time planner of an Edit-R2 RL run (`editr2 plan`), before renting GPUs.

The planner builds the real architectures from their configs on the meta device (accelerate's
`init_empty_weights`, no weights; `trl_editr2/plan_models.json` holds the released configs of Qwen-Image-Edit-2509 and
-2511), adds the trainer's own LoRA adapters with peft (`trl_editr2.policy.add_lora_adapters`, so the trainable count
is the trainer's), and then:

- counts parameters per component (accelerate's `compute_module_sizes` / `calculate_maximum_sizes` give the bytes and
  the largest FSDP unit);
- sizes the LoRA weights, gradients and AdamW state with accelerate's `estimate_training_usage` (the numbers of
  `accelerate estimate-memory`), applied to the trainable parameters only;
- measures activations by running the transformer and the text encoder's language model forward on meta tensors of
  the run's real shapes, summing what autograd saves for the backward pass (`saved_tensors_hooks`), per block, with
  attention counted as the fused kernel GPUs run (it saves q, k, v, the output and the log-sum-exp, never the
  `S x S` matrix);
- counts FLOPs of the same meta passes, forward and backward, with `torch.utils.flop_counter.FlopCounterMode`.

It then combines them per phase of a training step (reasoning, sampling, learning) for a parallel layout read from an
accelerate config (processes, FSDP sharding or DeepSpeed ZeRO stage, parameter / optimizer offload):

    per-GPU peak = max over phases of (resident weights + LoRA state + rollout records + the phase's working set)

What the estimate leaves out: the CUDA context and allocator fragmentation (budget 2-4 GiB per GPU: `--reserve-gib`),
NCCL buffers, and the reward models (judges run on their own servers). The tiny-model test (tests/test_plan.py)
checks parameter counts exactly and the learning phase's peak against torch's `MemTracker` on a real CPU run.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

MODELS_FILE = Path(__file__).with_name("plan_models.json")
GIB = 2**30
FSDP_BLOCK_CLASSES = ("QwenImageTransformerBlock", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")
# Tokens of the Qwen-Image-Edit prompt template that stay after its first 64 (dropped) tokens, around the condition
# image's vision tokens and the text: "Picture 1: <|vision_start|> ... <|vision_end|>" + "<|im_end|>\n<|im_start|>
# assistant\n".
TEMPLATE_TOKENS = 15
CHARS_PER_TOKEN = 4  # English text in Qwen's BPE: about 4 characters a token
HISTORY_TOKENS_PER_TURN = 40  # an earlier instruction and its intent in the IC-CoT request


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: model configs, parallel layout, hardware
# ---------------------------------------------------------------------------------------------------------------------


def model_names() -> list[str]:
    """The model names `editr2 plan --model` accepts."""
    return [k for k in json.loads(MODELS_FILE.read_text()) if not k.startswith("_")]


def load_model_configs(name: str) -> dict[str, dict]:
    """The `transformer`, `text_encoder` and `vae` configs of `name` (see `trl_editr2/plan_models.json`)."""
    models = json.loads(MODELS_FILE.read_text())
    if name not in models or name.startswith("_"):
        raise ValueError(f"Unknown model {name!r}; pass one of {model_names()}.")
    out = {}
    for component in ("transformer", "text_encoder", "vae"):
        config = models[name][component]
        if isinstance(config, str):  # shared with another model
            config = models[config][component]
        out[component] = {k: v for k, v in config.items() if not k.startswith("_")}
    return out


@dataclass
class Layout:
    """How the policy is spread over GPUs, read from an accelerate config ([`layout_from_accelerate_config`]).

    Args:
        num_processes: GPUs.
        shard_params: frozen + trainable weights sharded over the GPUs (FSDP FULL_SHARD, ZeRO-3).
        shard_grads: gradients sharded (FSDP, ZeRO-2/3).
        shard_optimizer: optimizer state sharded (FSDP, ZeRO-1/2/3).
        offload_params: weights kept in CPU memory and streamed in per block (FSDP `fsdp_offload_params`, ZeRO-3
            `offload_param_device: cpu`).
        offload_optimizer: optimizer state (and gradients) in CPU memory.
        name: a short description for the table.
    """

    num_processes: int = 1
    shard_params: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    offload_params: bool = False
    offload_optimizer: bool = False
    name: str = "1 process"


def layout_from_accelerate_config(config: dict | str | Path, num_processes: int | None = None) -> Layout:
    """A [`Layout`] from an accelerate config (a YAML path or its dict).

    Understands `distributed_type` `NO` / `MULTI_GPU` (replicated), `FSDP` (`fsdp_reshard_after_forward` true:
    FULL_SHARD; false: SHARD_GRAD_OP, weights unsharded between forward and backward; `fsdp_offload_params`) and
    `DEEPSPEED` (`zero_stage` 0-3, `offload_param_device` / `offload_optimizer_device`). `num_processes` overrides the
    config's.
    """
    if not isinstance(config, dict):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ValueError(f"accelerate config {str(path)!r} does not exist; pass a YAML file such as "
                             "examples/accelerate_configs/fsdp.yaml.")
        config = yaml.safe_load(path.read_text())
    n = int(num_processes or config.get("num_processes", 1) or 1)
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return Layout(n, name=f"{n} x DDP" if n > 1 else "1 process")
    if kind == "FSDP":
        fsdp = config.get("fsdp_config", {}) or {}
        reshard = fsdp.get("fsdp_reshard_after_forward", fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
        full = reshard in (True, "true", "FULL_SHARD", 1, "1")
        offload = bool(fsdp.get("fsdp_offload_params", False))
        name = f"{n} x FSDP {'full shard' if full else 'grad-op shard'}{' + CPU offload' if offload else ''}"
        return Layout(n, full, True, True, offload, offload, name)
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config", {}) or {}
        stage = int(ds.get("zero_stage", 0))
        offload_p = str(ds.get("offload_param_device", "none")).lower() in ("cpu", "nvme")
        offload_o = str(ds.get("offload_optimizer_device", "none")).lower() in ("cpu", "nvme")
        name = f"{n} x ZeRO-{stage}{' + param offload' if offload_p else ''}{' + optim offload' if offload_o else ''}"
        return Layout(n, stage >= 3, stage >= 2, stage >= 1, offload_p and stage >= 3, offload_o, name)
    raise ValueError(f"distributed_type {kind!r} is not planned; use NO, MULTI_GPU, FSDP or DEEPSPEED.")


@dataclass
class Hardware:
    """What a GPU sustains, for the time estimate (defaults: an H100 SXM at a realistic fraction of its peak).

    Args:
        memory_gib: GPU memory in GiB (H100 80GB: 79.6, H200 141GB: 140.4).
        tflops: achieved dense bf16 TFLOP/s in the transformer's matmuls (H100 peak 989; 40 % of it by default).
        hbm_gbps: achieved memory bandwidth (bounds the text encoder's token-by-token decoding).
        interconnect_gbps: per-GPU all-gather bandwidth between GPUs (NVLink 4: ~450 GB/s bus; 300 achieved).
        pcie_gbps: host <-> GPU bandwidth (offloaded weights stream over it).
        reserve_gib: CUDA context, allocator fragmentation and NCCL buffers, counted on top.
    """

    memory_gib: float = 79.6
    tflops: float = 400.0
    hbm_gbps: float = 2500.0
    interconnect_gbps: float = 300.0
    pcie_gbps: float = 25.0
    reserve_gib: float = 3.0


@dataclass
class Options:
    """Planner what-ifs beyond the training config.

    Args:
        frozen_dtype: storage of the frozen base weights: `"bf16"` (what the trainer does) or `"fp8"` (1 byte a
            weight; a what-if: the trainer does not store fp8 weights yet).
        offload_text_encoder: keep the frozen text encoder in CPU memory while the transformer samples and learns (a
            what-if: the trainer keeps it on the GPU).
        prompt_tokens: tokens of the reasoning request without its image (`None`: estimated from the IC-CoT template
            and `HISTORY_TOKENS_PER_TURN` per earlier turn).
    """

    frozen_dtype: str = "bf16"
    offload_text_encoder: bool = False
    prompt_tokens: int | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Models on the meta device
# ---------------------------------------------------------------------------------------------------------------------


def build_empty_models(configs: dict[str, dict], args=None, dtype: torch.dtype = torch.bfloat16
                       ) -> dict[str, nn.Module]:
    """The transformer, text encoder and VAE on the meta device; with `args` (an `EditR2Config`), the trainer's LoRA
    adapters are added exactly as the trainer adds them (`trl_editr2.policy.add_lora_adapters`)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # `.to(dtype)` warns about fp32 modules; these models have none
    try:
        return _build_empty_models(configs, args, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _build_empty_models(configs, args, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        transformer = QwenImageTransformer2DModel(**configs["transformer"]).to(dtype)
        text_config = Qwen2_5_VLConfig(**configs["text_encoder"])
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config).to(dtype)
        vae = AutoencoderKLQwenImage(**configs["vae"]).to(dtype)
        models = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        if args is not None:
            add_planned_adapters(models, args)
    return models


def add_planned_adapters(models: dict[str, nn.Module], args) -> None:
    """The trainer's adapters on meta models (call inside `init_empty_weights` so that nothing is allocated)."""
    from .policy import add_lora_adapters

    add_lora_adapters(SimpleNamespace(**models, reasoner=models["text_encoder"]), args)


@dataclass
class ComponentCount:
    """Parameters of one component: `total` (base + LoRA), `trainable`, `bytes` as stored, `largest_unit` (bytes
    of its largest FSDP unit) and `root` (bytes outside any FSDP unit: gathered for the whole rollout)."""

    total: int
    trainable: int
    bytes: int
    largest_unit: int
    root: int


def count_parameters(module: nn.Module, frozen_bytes: float | None = None) -> ComponentCount:
    """Parameter counts and sizes of `module` (accelerate's `compute_module_sizes` for the bytes).

    Args:
        frozen_bytes: bytes per frozen parameter (e.g. 1 for fp8 storage); `None` keeps the module's dtypes.
    """
    from accelerate.utils import compute_module_sizes

    params = list(module.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    sizes = compute_module_sizes(module)
    if frozen_bytes is None:
        size = sizes[""]
    else:
        size = int(sum(p.numel() * (p.element_size() if p.requires_grad else frozen_bytes) for _, p in params))
    scale = size / max(sizes[""], 1)
    units = [name for name, m in module.named_modules() if type(m).__name__ in FSDP_BLOCK_CLASSES]
    unit_sizes = [sizes[name] for name in units]
    largest = int(max(unit_sizes, default=sizes[""]) * scale)
    root = int((sizes[""] - sum(unit_sizes)) * scale)
    return ComponentCount(total, trainable, size, largest, root)


def parameter_table(models: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """Parameters per component and sub-component (total / trainable)."""
    te = models["text_encoder"]
    language = te.model.language_model
    parts = {
        "transformer": models["transformer"],
        "text_encoder.language_model": language,
        "text_encoder.visual": te.model.visual,
        "text_encoder.lm_head": te.lm_head,
        "vae": models["vae"],
    }
    out = {}
    for name, module in parts.items():
        params = list(module.parameters())
        out[name] = {"total": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad)}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Activations and FLOPs from meta passes
# ---------------------------------------------------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """`scaled_dot_product_attention` as the fused GPU kernels keep it for backward: q, k, v, out and an fp32
    log-sum-exp per query (flash / memory-efficient attention), never the attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **kwargs):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention():
    """Route `torch.nn.functional.scaled_dot_product_attention` through [`_FusedAttention`] (memory accounting)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@dataclass
class PassProfile:
    """What one forward pass with gradients keeps for its backward, in bytes, and its FLOPs.

    Args:
        saved: everything autograd saves (no checkpointing).
        block_saved: the largest single block's saved bytes (recomputed one at a time under checkpointing).
        block_inputs: the blocks' inputs (what checkpointing keeps).
        outside: saved outside the blocks (kept with or without checkpointing).
        largest_tensor: the largest tensor the forward creates (saved or not: e.g. the text encoder's full logits);
            an op's input and output of that size are alive together at the pass's high-water mark.
        forward_flops, backward_flops: FLOPs (`FlopCounterMode`; attention's backward included).
    """

    saved: int = 0
    block_saved: int = 0
    block_inputs: int = 0
    outside: int = 0
    largest_tensor: int = 0
    forward_flops: int = 0
    backward_flops: int = 0

    def activations(self, checkpointing: bool) -> int:
        """Bytes this pass keeps until its backward (checkpointed: outside the blocks + the blocks' inputs; the one
        block recomputed at a time during the backward is added once per step by the caller)."""
        if checkpointing:
            return self.outside + self.block_inputs
        return self.saved

    def scaled(self, factor: float) -> "PassProfile":
        return PassProfile(**{k: int(v * factor) for k, v in asdict(self).items()})


class _LargestOutput:
    """The largest tensor any op creates while active (a dispatch mode; works on meta tensors)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.bytes = 0
        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        outer.bytes = max(outer.bytes, t.numel() * t.element_size())
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def profile_pass(run, blocks: list[nn.Module], params: set[int], fused: bool = True) -> PassProfile:
    """Run `run()` (a forward returning a tensor that needs grad) on meta tensors and profile it (see [`PassProfile`]).

    Saved tensors are counted once per storage (views resolved to their base); parameters and leaf inputs are not
    counted (they are weights or rollout records, counted elsewhere). `fused=False` keeps PyTorch's own attention
    (on meta tensors: the math path, which saves the attention matrix, as a CPU run with a mask does).
    """
    seen: dict[int, tuple[int, int]] = {}  # id(base) -> (bytes, block index or -1)
    keep: list[torch.Tensor] = []
    current = [-1]
    inputs: dict[int, int] = {}

    def pack(tensor):
        base = _root(tensor)
        if id(base) not in seen and id(base) not in params and (base.grad_fn is not None or base.requires_grad):
            if not (base.requires_grad and base.grad_fn is None):  # trainable parameters
                seen[id(base)] = (base.numel() * base.element_size(), current[0])
                keep.append(base)
        return tensor

    def pre_hook(index):
        def hook(module, args, kwargs):
            current[0] = index
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            for t in tensors:
                if t.is_floating_point():
                    inputs[id(_root(t))] = t.numel() * t.element_size()
                    keep.append(t)
        return hook

    def post_hook(module, args, kwargs, output):
        current[0] = -1

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
    from torch.utils.flop_counter import FlopCounterMode

    try:
        attention = fused_attention() if fused else contextlib.nullcontext()
        with attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with FlopCounterMode(display=False) as forward_counter, _LargestOutput() as largest:
                out = run()
        with FlopCounterMode(display=False) as backward_counter:
            out.float().sum().backward()
    finally:
        for h in handles:
            h.remove()
    per_block: dict[int, int] = {}
    for size, block in seen.values():
        per_block[block] = per_block.get(block, 0) + size
    return PassProfile(
        saved=sum(size for size, _ in seen.values()),
        block_saved=max((v for k, v in per_block.items() if k >= 0), default=0),
        block_inputs=sum(inputs.values()),
        outside=per_block.get(-1, 0),
        largest_tensor=largest.bytes,
        forward_flops=forward_counter.get_total_flops(),
        backward_flops=backward_counter.get_total_flops(),
    )


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def transformer_pass(transformer: nn.Module, batch: int, image_tokens: int, reference_tokens: int, text_tokens: int,
                     img_shapes: list, dtype=torch.bfloat16, fused: bool = True) -> PassProfile:
    """Profile one transformer forward (batch `batch`, `image_tokens + reference_tokens` image-stream tokens,
    `text_tokens` text tokens) on meta tensors, with gradients flowing to its LoRA adapters.

    `img_shapes` is the pipeline's `(frames, h, w)` list of the target and its references (latent patches).
    """
    config = transformer.config
    meta = torch.device("meta")
    hidden = torch.empty(batch, image_tokens + reference_tokens, config.in_channels, device=meta, dtype=dtype)
    text = torch.empty(batch, text_tokens, config.joint_attention_dim, device=meta, dtype=dtype)
    mask = torch.ones(batch, text_tokens, device=meta, dtype=torch.long)
    timestep = torch.empty(batch, device=meta, dtype=dtype)

    def run():
        return transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text,
                           encoder_hidden_states_mask=mask, img_shapes=[img_shapes] * batch, return_dict=False)[0]

    blocks = list(transformer.transformer_blocks)
    profile = profile_pass(run, blocks, _param_ids(transformer), fused)
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    seq = image_tokens + reference_tokens + text_tokens
    attention = 4 * batch * heads * head_dim * seq * seq * len(blocks)  # QK^T and PV, 2 FLOPs a multiply-add
    profile.forward_flops += attention
    profile.backward_flops += int(2.5 * attention)  # flash attention's backward: 2.5x its forward
    return profile


def text_pass(text_encoder: nn.Module, batch: int, prompt_tokens: int, completion_tokens: int,
              dtype=torch.bfloat16, fused: bool = True) -> PassProfile:
    """Profile the teacher-forced pass of the reasoning loss (`trl_editr2.policy.completion_logps`): the language model
    over `prompt + completion` tokens, the full logits, the fp32 log-softmax of the completion. The vision tower is
    frozen and runs without gradients (its output counts as an input)."""
    config = text_encoder.config.text_config
    meta = torch.device("meta")
    seq = prompt_tokens + completion_tokens
    embeds = torch.empty(batch, seq, config.hidden_size, device=meta, dtype=dtype)
    positions = torch.empty(3, batch, seq, device=meta, dtype=torch.long)
    ids = torch.empty(batch, completion_tokens, device=meta, dtype=torch.long)
    language = text_encoder.model.language_model

    def run():
        hidden = language(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        logits = text_encoder.lm_head(hidden)  # (G, P + L, V)
        logits = logits[:, prompt_tokens - 1 : -1].float() / 0.7
        return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    profile = profile_pass(run, list(language.layers), _param_ids(text_encoder), fused)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    attention = 2 * batch * heads * head_dim * seq * seq * config.num_hidden_layers  # causal: half of 4 S^2 d
    profile.forward_flops += attention
    profile.backward_flops += int(2.5 * attention)
    return profile


# ---------------------------------------------------------------------------------------------------------------------
# Shapes of a step
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StepShapes:
    """Token counts of one turn (per rollout) and of the step."""

    image_tokens: int  # target latent patches
    reference_tokens: int  # the reference image's latent patches (the larger of turn 1's source and later turns)
    text_tokens: int  # conditioning text (template + condition image + intent)
    negative_text_tokens: int  # the negative prompt's (template + condition image + " ")
    vision_tokens: int  # merged vision tokens of one condition image
    vision_patches: int  # vision tower patches of one condition image
    prompt_tokens: int  # reasoning request, image included
    completion_tokens: int  # reasoning answer (at most max_reasoning_tokens)
    img_shapes: list = field(default_factory=list)


def _vision_grid(condition_area: int, patch: int, merge: int) -> tuple[int, int]:
    """`(h, w)` vision patches of a square image of `condition_area` pixels (Qwen2-VL's smart resize to multiples of
    `patch * merge`)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    width, height = calculate_dimensions(condition_area, 1.0)
    factor = patch * merge
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    return h // patch, w // patch


def step_shapes(args, text_config: dict, vae_scale: int = 8, patch: int = 2, options: Options | None = None
                ) -> StepShapes:
    """Token counts of the run `args` (an `EditR2Config`) for the text encoder described by `text_config`."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    from editr2 import intent

    options = options or Options()
    size = args.resolution or 1024
    per_side = size // (vae_scale * patch)
    image_tokens = per_side * per_side
    ref_side = size
    if args.reference_area is not None:
        ref_side, _ = calculate_dimensions(args.reference_area, 1.0)
    ref_tokens = max((ref_side // (vae_scale * patch)) ** 2, image_tokens)
    vision = text_config.get("vision_config", {})
    gh, gw = _vision_grid(args.condition_area, vision.get("patch_size", 14), vision.get("spatial_merge_size", 2))
    merge = vision.get("spatial_merge_size", 2)
    vision_tokens = (gh // merge) * (gw // merge)
    completion = args.max_reasoning_tokens if args.reasoning == "intent" else 0
    text_tokens = TEMPLATE_TOKENS + vision_tokens + (completion or 32)
    request = options.prompt_tokens
    if request is None:
        request = math.ceil(len(intent.SYSTEM_PROMPT + intent.DEFAULT_TEMPLATE) / CHARS_PER_TOKEN)
        request += HISTORY_TOKENS_PER_TURN * args.num_turns
    ref = int(math.isqrt(ref_tokens))
    return StepShapes(image_tokens, ref_tokens, text_tokens, TEMPLATE_TOKENS + vision_tokens + 1, vision_tokens,
                      gh * gw, request + vision_tokens, completion, [(1, per_side, per_side), (1, ref, ref)])


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The planner's numbers; memory in bytes per GPU, time in seconds per optimizer step."""

    model: str
    layout: Layout
    hardware: Hardware
    options: Options
    shapes: StepShapes
    parameters: dict[str, dict[str, int]]
    memory: dict[str, float]
    phases: dict[str, float]
    time: dict[str, float]
    settings: dict[str, Any]

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak + self.hardware.reserve_gib * GIB <= self.hardware.memory_gib * GIB


def _resident(count: ComponentCount, layout: Layout) -> float:
    """Bytes of one component's weights on each GPU between its passes (+ the units gathered while it runs)."""
    if layout.offload_params:  # streamed from CPU memory a unit at a time (+ the prefetched next one)
        return min(count.bytes, count.root + 2 * count.largest_unit)
    if layout.shard_params:  # a shard of everything, the root gathered for the rollout, two units gathered
        sharded = count.bytes / layout.num_processes + count.root * (1 - 1 / layout.num_processes)
        return min(count.bytes, sharded + 2 * count.largest_unit)
    return count.bytes


def lora_state_bytes(trainable: int, layout: Layout, mixed_precision: str = "bfloat16") -> dict[str, float]:
    """LoRA weights, gradients and AdamW state per GPU: accelerate's `estimate_training_usage` of the fp32 trainable
    weights (weights; gradients incl. the bf16 compute copy; two Adam moments), divided as the layout shards them."""
    from accelerate.commands.estimate import estimate_training_usage

    usage = estimate_training_usage(trainable * 4, mixed_precision)
    n = layout.num_processes
    weights = usage["model"] / (n if layout.shard_params else 1)
    grads = usage["gradients"] / (n if layout.shard_grads else 1)
    optimizer = usage["optimizer"] / (n if layout.shard_optimizer else 1)
    if layout.offload_optimizer:
        optimizer, grads = 0.0, grads / 3  # state on the CPU; the bf16 compute copy stays
    return {"lora_weights": weights, "lora_grads": grads, "optimizer": optimizer}


def records_bytes(args, shapes: StepShapes, transformer_config: dict, text_hidden: int) -> float:
    """What one process keeps from its rollouts until the loss has run: per session and turn, the K + 1 window latents,
    the batched conditioning (prompt / negative embeddings, reference latents) and the reasoning inputs."""
    g, k = args.num_generations, args.sde_window_size
    channels = transformer_config["in_channels"]
    latents = (k + 1) * g * shapes.image_tokens * channels * 2 + g * shapes.reference_tokens * channels * 2
    embeds = g * (shapes.text_tokens + shapes.negative_text_tokens) * text_hidden * 2
    pixels = g * shapes.vision_patches * 3 * 2 * 14 * 14 * 4  # fp32 patches of the condition image
    text = g * (shapes.prompt_tokens + shapes.completion_tokens) * 8 * 3
    return float(args.per_device_train_batch_size * args.num_turns * (latents + embeds + pixels + text))


def kv_cache_bytes(args, shapes: StepShapes, text_config: dict) -> float:
    """The reasoning sampler's key/value cache: G sequences of prompt + answer, every layer, keys and values, bf16."""
    tc = text_config["text_config"]
    head_dim = tc["hidden_size"] // tc["num_attention_heads"]
    seq = shapes.prompt_tokens + shapes.completion_tokens
    return float(args.num_generations * seq * tc["num_hidden_layers"] * 2 * tc["num_key_value_heads"] * head_dim * 2)


def plan(args, layout: Layout, hardware: Hardware | None = None, options: Options | None = None,
         model: str = "qwen_image_edit_2509", configs: dict[str, dict] | None = None, shapes: StepShapes | None = None,
         dtype: torch.dtype = torch.bfloat16, fused_attention: bool = True) -> Plan:
    """Plan the run `args` (an `EditR2Config`) on `layout`.

    Args:
        args: the training configuration (batch, resolution, G, turns, steps, LoRA, checkpointing, ...).
        layout: GPUs and sharding ([`layout_from_accelerate_config`]).
        hardware: per-GPU memory and throughput for the fit and the time estimate.
        options: what-ifs (fp8 frozen storage, text-encoder offload during sampling, request length).
        model: a name of `trl_editr2/plan_models.json`, used when `configs` is not given.
        configs: `transformer` / `text_encoder` / `vae` config dicts (e.g. of the tiny test models).
        shapes: token counts measured elsewhere (e.g. of a real rollout) instead of [`step_shapes`]' estimate.
        dtype: the frozen weights' and activations' dtype (`bfloat16` with `bf16: true`; `float32` on CPU).
        fused_attention: count attention as the fused GPU kernels keep it (True) or as PyTorch's math path (False:
            what a CPU run with an attention mask saves).
    """
    hardware = hardware or Hardware()
    options = options or Options()
    if options.frozen_dtype not in ("bf16", "fp8"):
        raise ValueError(f"frozen_dtype must be 'bf16' or 'fp8', got {options.frozen_dtype!r}.")
    configs = configs or load_model_configs(model)
    models = build_empty_models(configs, args, dtype)
    shapes = shapes or step_shapes(args, configs["text_encoder"], options=options)
    frozen_bytes = 1 if options.frozen_dtype == "fp8" else None
    counts = {name: count_parameters(models[name], frozen_bytes) for name in ("transformer", "text_encoder", "vae")}
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing",
                                                                                     False))
    g, k = args.num_generations, args.sde_window_size
    cfg_passes = 2 if args.true_cfg_scale > 1 else 1

    # Activations of one (session, turn) of the loss: K window steps x CFG passes, then the reasoning tokens
    transformer, text_encoder = models["transformer"], models["text_encoder"]
    cond = transformer_pass(transformer, g, shapes.image_tokens, shapes.reference_tokens, shapes.text_tokens,
                            shapes.img_shapes, dtype, fused_attention)
    neg = PassProfile()
    if cfg_passes == 2:
        neg = transformer_pass(transformer, g, shapes.image_tokens, shapes.reference_tokens,
                               shapes.negative_text_tokens, shapes.img_shapes, dtype, fused_attention)
    train_text = args.train_reasoning and args.reasoning == "intent"
    text = PassProfile()
    if train_text:
        text = text_pass(text_encoder, g, shapes.prompt_tokens, shapes.completion_tokens, dtype, fused_attention)
    recompute = max(cond.block_saved, neg.block_saved, text.block_saved)  # one block at a time in the backward
    image_acts = k * (cond.activations(checkpointing) + neg.activations(checkpointing))
    text_acts = text.activations(checkpointing)
    if checkpointing:
        image_acts += recompute
    # the high-water mark inside a pass: its largest op output (e.g. the text pass's full logits, and their gradient)
    transient = max(cond.largest_tensor, neg.largest_tensor, text.largest_tensor)

    # Weights resident per GPU
    w_transformer = _resident(counts["transformer"], layout)
    w_text = _resident(counts["text_encoder"], layout)
    w_vae = counts["vae"].bytes  # not wrapped: replicated
    precision = "float32" if dtype == torch.float32 else "bfloat16"
    lora = lora_state_bytes(counts["transformer"].trainable + counts["text_encoder"].trainable, layout, precision)
    records = records_bytes(args, shapes, configs["transformer"], configs["text_encoder"]["text_config"]["hidden_size"])
    kv = kv_cache_bytes(args, shapes, configs["text_encoder"])
    old_logps = 2 * text.largest_tensor  # the teacher-forced pass without gradients: its full logits
    sampling_work = 2 * max(cond.largest_tensor, neg.largest_tensor)
    lora_total = sum(lora.values())
    text_during_sampling = 0.0 if options.offload_text_encoder else w_text

    memory = {
        "weights_transformer": w_transformer,
        "weights_text_encoder": w_text,
        "weights_vae": w_vae,
        **lora,
        "rollout_records": records,
        "kv_cache": kv,
        "activations_image": image_acts,
        "activations_text": text_acts,
        "activations_image_no_ckpt": k * (cond.saved + neg.saved),
        "activations_image_ckpt": k * (cond.activations(True) + neg.activations(True)) + recompute,
        "activations_text_no_ckpt": text.saved,
        "activations_text_ckpt": text.activations(True),
        "transient": transient,
    }
    base = w_transformer + w_vae + lora_total  # LoRA gradients live from the first backward to the optimizer step
    phases = {
        "reasoning": base + w_text + records + kv + old_logps,
        "sampling": base + text_during_sampling + records + sampling_work,
        "learning": base + w_text + records + image_acts + text_acts + transient,
    }

    time = step_time(args, layout, hardware, counts, cond, neg, text, models, shapes, checkpointing)
    settings = {k_: getattr(args, k_) for k_ in (
        "resolution", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "num_turns",
        "num_inference_steps", "sde_window_size", "true_cfg_scale", "max_reasoning_tokens", "lora_r", "text_lora_r",
        "beta", "train_reasoning")}
    settings["activation_checkpointing"] = checkpointing
    return Plan(model, layout, hardware, options, shapes, parameter_table(models), memory, phases, time, settings)


def step_time(args, layout: Layout, hardware: Hardware, counts, cond: PassProfile, neg: PassProfile,
              text: PassProfile, models, shapes: StepShapes, checkpointing: bool) -> dict[str, float]:
    """Seconds per optimizer step: FLOPs at `hardware.tflops`, the reasoning decode at `hardware.hbm_gbps`, and the
    weights each pass gathers (sharded: over the interconnect; offloaded: over PCIe), overlapped with compute (max)."""
    flops_per_s = hardware.tflops * 1e12

    def gather_s(count: ComponentCount) -> float:
        if layout.offload_params:
            return count.bytes / layout.num_processes / (hardware.pcie_gbps * 1e9) + (
                count.bytes / (hardware.interconnect_gbps * 1e9) if layout.num_processes > 1 else 0.0)
        if layout.shard_params:
            return count.bytes * (1 - 1 / layout.num_processes) / (hardware.interconnect_gbps * 1e9)
        return 0.0

    def pass_s(flops: float, count: ComponentCount) -> float:
        return max(flops / flops_per_s, gather_s(count))

    g, k, turns = args.num_generations, args.sde_window_size, args.num_turns
    sessions = args.per_device_train_batch_size * args.gradient_accumulation_steps
    tr, te = counts["transformer"], counts["text_encoder"]
    fwd = cond.forward_flops + neg.forward_flops
    bwd = cond.backward_flops + neg.backward_flops
    # Sampling: every denoising step runs the CFG passes without gradients (2 passes gathered each)
    passes = 2 if args.true_cfg_scale > 1 else 1
    sampling = args.num_inference_steps * (pass_s(cond.forward_flops, tr) + (pass_s(neg.forward_flops, tr)
                                                                              if passes == 2 else 0.0))
    # Learning: per window step, CFG passes forward + backward (+ recompute), and the adapter-off reference forward
    recompute = fwd if checkpointing else 0
    learn_step = pass_s(fwd + bwd + recompute, tr) * passes + (pass_s(fwd, tr) * passes if args.beta > 0 else 0.0)
    learn = k * learn_step / passes
    # Reasoning: prefill + token-by-token decode (bounded by reading the weights), the teacher-forced old log-probs;
    # the loss's teacher-forced pass forward + backward
    reasoning = 0.0
    text_learn = 0.0
    if args.reasoning == "intent":
        language = sum(p.numel() for p in models["text_encoder"].model.language_model.parameters())
        prefill = 2 * language * g * shapes.prompt_tokens
        weight_read = te.bytes / (layout.num_processes if layout.shard_params else 1) / (hardware.hbm_gbps * 1e9)
        decode = shapes.completion_tokens * max(weight_read, gather_s(te), 2 * language * g / flops_per_s)
        reasoning = prefill / flops_per_s + decode + pass_s(text.forward_flops, te)
        if args.train_reasoning:
            text_learn = pass_s(text.forward_flops * (2 if checkpointing else 1) + text.backward_flops, te)
    # Encode: the text encoder's no-grad pass over each rollout's conditioning (and negative) prompt with its image
    te_model = models["text_encoder"].model
    vision = 2 * sum(p.numel() for p in te_model.visual.parameters()) * g * shapes.vision_patches
    language_params = sum(p.numel() for p in te_model.language_model.parameters())
    prompt_tokens = shapes.text_tokens + (shapes.negative_text_tokens if passes == 2 else 0)
    encode = pass_s(passes * vision + 2 * language_params * g * prompt_tokens, te)
    per_turn = {"reasoning": reasoning, "encode": encode, "sampling": sampling, "learn": learn + text_learn}
    out = {name: value * turns * sessions for name, value in per_turn.items()}
    out["step"] = sum(out.values())
    out["tflop_per_step"] = sessions * turns * (
        args.num_inference_steps * (cond.forward_flops + (neg.forward_flops if passes == 2 else 0))
        + k * (fwd + bwd + recompute + (fwd if args.beta > 0 else 0))
        + text.forward_flops * 2 + text.backward_flops
    ) / 1e12
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_plan(p: Plan) -> str:
    """The plan as Markdown: parameters, per-GPU memory per part and phase, and the step time."""
    lines = [f"### {p.model}: {p.layout.name}, GPUs of {p.hardware.memory_gib:g} GiB", ""]
    s = p.settings
    lines.append(
        f"resolution {s['resolution']}, {s['per_device_train_batch_size']} session(s)/GPU x "
        f"{s['gradient_accumulation_steps']} accumulation, G={s['num_generations']}, T={s['num_turns']}, "
        f"{s['num_inference_steps']} steps (SDE window {s['sde_window_size']}), CFG {s['true_cfg_scale']:g}, "
        f"{s['max_reasoning_tokens']} reasoning tokens, "
        f"checkpointing {'on' if s['activation_checkpointing'] else 'off'}"
        f", frozen weights {p.options.frozen_dtype}"
        + (", text encoder offloaded while sampling" if p.options.offload_text_encoder else "")
    )
    sh = p.shapes
    lines += ["", f"tokens per rollout and turn: image {sh.image_tokens} + reference {sh.reference_tokens}, text "
                  f"{sh.text_tokens} (negative {sh.negative_text_tokens}); reasoning request {sh.prompt_tokens} + "
                  f"answer {sh.completion_tokens}", ""]
    lines += ["| component | parameters (with LoRA) | trainable (LoRA) |", "|---|---:|---:|"]
    for name, c in p.parameters.items():
        lines.append(f"| {name} | {c['total'] / 1e9:.3f} B | {c['trainable'] / 1e6:.1f} M |")
    m = p.memory
    lines += ["", "| per GPU (GiB) | value |", "|---|---:|"]
    rows = [
        ("weights: transformer", m["weights_transformer"]), ("weights: text encoder", m["weights_text_encoder"]),
        ("weights: VAE", m["weights_vae"]), ("LoRA weights (fp32)", m["lora_weights"]),
        ("LoRA gradients", m["lora_grads"]), ("AdamW state", m["optimizer"]),
        ("rollout records (latents, embeddings)", m["rollout_records"]), ("reasoning KV cache", m["kv_cache"]),
        ("activations, image loss (checkpointing / none)",
         f"{_gib(m['activations_image_ckpt'])} / {_gib(m['activations_image_no_ckpt'])}"),
        ("activations, text loss (checkpointing / none)",
         f"{_gib(m['activations_text_ckpt'])} / {_gib(m['activations_text_no_ckpt'])}"),
    ]
    rows += [(f"peak in {name}", value) for name, value in p.phases.items()]
    rows.append(("**peak + reserve**", p.peak + p.hardware.reserve_gib * GIB))
    for name, value in rows:
        lines.append(f"| {name} | {value if isinstance(value, str) else _gib(value)} |")
    verdict = "fits" if p.fits else "does NOT fit"
    t = p.time
    lines += ["", f"**{verdict}** in {p.hardware.memory_gib:g} GiB ({_gib(p.peak + p.hardware.reserve_gib * GIB)} GiB "
                  f"with {p.hardware.reserve_gib:g} GiB reserve).", "",
              f"step time at {p.hardware.tflops:g} TFLOP/s, {p.hardware.hbm_gbps:g} GB/s HBM, "
              f"{p.hardware.interconnect_gbps:g} GB/s interconnect: **{t['step']:.0f} s** per optimizer step "
              f"(reasoning {t['reasoning']:.0f} s, encode {t['encode']:.0f} s, sampling {t['sampling']:.0f} s, "
              f"learning {t['learn']:.0f} s; {t['tflop_per_step']:.0f} TFLOP per GPU; judges not included)"]
    return "\n".join(lines)


def plan_to_dict(p: Plan) -> dict:
    """The plan as plain JSON-able data."""
    out = asdict(p)
    out["peak"] = p.peak
    out["fits"] = p.fits
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Measuring a real run (CPU: no allocator statistics)
# ---------------------------------------------------------------------------------------------------------------------


class LiveMemory:
    """Current and peak bytes of the tensor storages created while active (any device but meta): what
    `torch.cuda.max_memory_allocated` reports on a GPU, for CPU runs. Built like torch's
    `torch.distributed._tools.mem_tracker.MemTracker` (a dispatch mode + weak references to storages), which itself
    cannot run on models with frozen parameters.

    Example:

        with LiveMemory() as memory:
            loss = model(x).sum(); loss.backward()
        memory.peak  # bytes above what existed before
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def __enter__(self) -> "LiveMemory":
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _record(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if not key or key in self._live:
                continue
            size = storage.nbytes()
            self._live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
