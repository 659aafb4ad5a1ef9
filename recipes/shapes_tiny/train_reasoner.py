"""Stage 2: reasoner SFT of the tiny Qwen2.5-VL text encoder (IC-CoT: a short trace, then the operative intent).

The text encoder learns to answer `editr2.intent.build_messages(history, instruction)` (rendered with the chat
template, the current image appended, exactly as `EditR2Pipeline.prepare_reasoning_inputs` builds it) with
`format_answer(short trace, gold intent)` on generated cm and cu sessions (fresh sessions every step). The gold
intent is `ShapesSession.gold_intent`; the trace is the shapes reconstructor's, shortened (`common.short_trace`).

The model is trained fully and then frozen: it is also the conditioning encoder of stage 3 (at this size a LoRA has
too little capacity to learn the reasoning, see docs/training.md). The evaluation runs the pipeline's own
`reason()` (greedy) on held-out sessions: exact match of the intent and the text-side intent score.

    python -m recipes.shapes_tiny.train_reasoner --run_dir runs/reasoner       # resumes RUN_DIR if present
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.shapes_tiny import common


@dataclass
class ReasonerConfig(common.TrainConfig):
    """Stage-2 settings (optimisation, checkpoints, device, mixed precision, `max_minutes` and `data_workers`:
    `common.TrainConfig`).

    Args:
        vocab_size, tokenizer_sessions: the shapes tokenizer (BPE trained on generated sessions; deterministic).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Qwen2.5-VL text model.
        vision_hidden, vision_depth: its (tiny) vision tower.
        condition_size: side in pixels of the image the VLM sees (`condition_area = condition_size ** 2`).
        image_size: side of the rendered MICE-Shapes images.
        max_turns: sessions of 1..max_turns turns are drawn.
        curriculum: `[[fraction_of_max_steps, max_history_turns], ...]`, in order: until that fraction of the run,
            only turns with at most that many earlier turns (fewer distracting objects to retrieve from); then any.
        eval_sessions, eval_turns: greedy evaluation on held-out sessions (per family), every `eval_every` steps.
        max_new_tokens: reasoning budget at evaluation.
        base_run: a finished full-SFT run of this script; when set, its text encoder (and tokenizer) is loaded and
            frozen, and only a reasoning LoRA is trained on top (the base stays the conditioning encoder).
        init_from: a checkpoint folder of another full-SFT run of this script (`RUN/checkpoints/step_X`): a new run
            starts from its weights and its tokenizer (`RUN/tokenizer`) instead of a fresh init, with its own
            schedule and data settings (e.g. a larger `condition_size`: the vision tower reads any image size). The
            architecture fields must match that run's `config.json`.
        final_sessions: held-out sessions per family of the final evaluation (0 = 4 x `eval_sessions`).
        lora_rank, lora_alpha: the LoRA (on the language model's attention and MLP projections; alpha 0 = rank).
        quote_edit: the trace starts by quoting the current edit clause (`common.reasoning_trace`).
        short_template: `[[fraction_of_max_steps, probability], ...]`, in order: until that fraction of the run, an
            example uses the short request template `SHORT_TEMPLATE` (no boilerplate) with that probability; after
            the last entry, always the default template. Retrieval from a short prompt is learned much faster (the
            attention to the slot words is not diluted over ~250 tokens of boilerplate) and carries over.
        aux_copy: `[[fraction_of_max_steps, batch_size], ...]`: until that fraction of the run, each step also trains
            on `batch_size` synthetic copy sequences (random tokens, a separator, the same tokens again), which form
            the model's copy (induction) heads in ~100 steps; the real task alone sat on a plateau for 600 steps.
        aux_copy_length: tokens per synthetic sequence half.
        template: the request template outside the `short_template` schedule and at evaluation: "default" (the
            pipeline's `DEFAULT_TEMPLATE`) or "short" (`SHORT_TEMPLATE`; export then writes it into the model's call
            defaults, so the pipeline asks the model the way it was trained).
        phrasing: the words of the training sessions: "grammar" (the fixed grammar, as the shipped reasoner was
            trained) or "seen" (everyday phrasing in the training families `language.SEEN_FAMILIES`, traces from the
            oracle reader where the grammar's reconstructor cannot read the words, `common.natural_trace`). The
            held-out families are never drawn; with "seen" the tokenizer also learns the seen families' words, and
            every evaluation reports the grammar, "seen" and "unseen" (held-out) phrasing side by side.
        grammar_fraction: with `phrasing: seen`, the fraction of examples still drawn in the fixed grammar (so its
            wording, which the bench and the editor's data use, is not forgotten).
        cu_fraction: the fraction of training sessions drawn from the cu family (back-references and undos: where
            reasoner v4 fails most); the rest are cm. 0.5 draws the family as the earlier runs did (bit for bit).
        answer_logits: compute the language-model head and the loss only at the positions whose next token is
            trained (the answer), instead of the model's own `loss` over every position (the same loss up to float
            rounding; on the CPU the head over the 2048-token vocabulary at the ~180 prompt and padding positions
            was most of the step, see recipes/shapes_tiny/README.md). Off by default, so the shipped runs
            reproduce bit for bit.
        length_buckets: split each step's batch into this many batches of rows of similar length (sorted), each
            padded only to its own longest row, the loss still the mean over the whole batch's answer tokens (1 = one
            padded batch; > 1 needs `answer_logits`). The SFT rows vary from ~120 to ~330 tokens: one padded batch
            was ~27% padding.
    """

    vocab_size: int = 2048
    tokenizer_sessions: int = 3000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_hidden: int = 32
    vision_depth: int = 1
    condition_size: int = 32
    image_size: int = 64
    max_turns: int = 6
    curriculum: common.Seq = ()
    max_steps: int = 1200
    weight_decay: float = 0.01
    eval_every: int = 400
    eval_sessions: int = 16
    eval_turns: int = 3
    max_new_tokens: int = 96
    quote_edit: bool = True
    short_template: common.Seq = ()
    aux_copy: common.Seq = ()
    aux_copy_length: int = 12
    template: str = "default"
    base_run: str = ""
    init_from: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    final_sessions: int = 0
    phrasing: str = "grammar"
    grammar_fraction: float = 0.0
    cu_fraction: float = 0.5
    answer_logits: bool = False
    length_buckets: int = 1

    FROZEN_FIELDS = ("seed", "vocab_size", "tokenizer_sessions", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "vision_hidden", "vision_depth", "base_run", "lora_rank",
                     "phrasing", "init_from")
    ARCHITECTURE_FIELDS = ("vocab_size", "tokenizer_sessions", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                           "intermediate_size", "vision_hidden", "vision_depth")

    def __post_init__(self):
        super().__post_init__()
        if self.phrasing not in TRAIN_PHRASINGS:
            raise ValueError(f"phrasing={self.phrasing!r}: pass one of {TRAIN_PHRASINGS} (the held-out families "
                             "'unseen' / 'all' are for evaluation only).")
        if self.length_buckets < 1 or self.length_buckets > self.batch_size:
            raise ValueError(f"length_buckets={self.length_buckets}: pass 1 (one padded batch) up to batch_size.")
        if self.length_buckets > 1 and not self.answer_logits:
            raise ValueError(f"length_buckets={self.length_buckets} needs answer_logits: true (or pass 1).")
        if not 0.0 <= self.grammar_fraction <= 1.0:
            raise ValueError(f"grammar_fraction={self.grammar_fraction}: pass a fraction in [0, 1].")
        if not 0.0 <= self.cu_fraction <= 1.0:
            raise ValueError(f"cu_fraction={self.cu_fraction}: pass a fraction in [0, 1].")
        if self.init_from and self.base_run:
            raise ValueError("init_from and base_run are both set: pass one (init_from starts a full SFT from a "
                             "checkpoint; base_run trains a LoRA on a frozen finished run).")


def init_source(cfg: ReasonerConfig) -> Path:
    """The run folder of `cfg.init_from` (a `RUN/checkpoints/step_X` folder), checked against `cfg`."""
    checkpoint = Path(cfg.init_from)
    run = checkpoint.parent.parent
    if not (checkpoint / "model.safetensors").is_file() or not (run / "config.json").is_file():
        raise ValueError(f"init_from={cfg.init_from!r}: pass a checkpoint folder of a run of this script "
                         "(RUN/checkpoints/step_X, with model.safetensors and RUN/config.json).")
    source = json.loads((run / "config.json").read_text())
    if source.get("base_run"):
        raise ValueError(f"init_from={cfg.init_from!r} is a LoRA run: pass a checkpoint of a full-SFT run.")
    wrong = {f: (source.get(f), getattr(cfg, f)) for f in cfg.ARCHITECTURE_FIELDS if source.get(f) != getattr(cfg, f)}
    if wrong:
        raise ValueError(f"init_from={cfg.init_from!r}: the architecture differs from this config "
                         f"(field: (that run, this config)) {wrong}.")
    return run


TRAIN_PHRASINGS = ("grammar", "seen")
EVAL_PHRASINGS = ("grammar", "seen", "unseen")

SHORT_TEMPLATE = 'History:\n{history}\nRules:\n{rules}\nInstruction: "{instruction}"'


def request_template(cfg: ReasonerConfig) -> str | None:
    """The template used outside the `short_template` schedule and at evaluation (None = the pipeline's default)."""
    if cfg.template not in ("default", "short"):
        raise ValueError(f"template={cfg.template!r}: pass 'default' or 'short'.")
    return SHORT_TEMPLATE if cfg.template == "short" else None
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTER_NAME = "reasoning"


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_or_build_tokenizer(cfg: ReasonerConfig, run_dir: Path):
    """The shapes tokenizer, trained once and kept in `RUN_DIR/tokenizer`."""
    from transformers import Qwen2Tokenizer

    if cfg.base_run:
        return Qwen2Tokenizer.from_pretrained(Path(cfg.base_run) / "tokenizer")
    path = run_dir / "tokenizer"
    if not path.is_dir():
        if cfg.init_from:
            tokenizer = Qwen2Tokenizer.from_pretrained(init_source(cfg) / "tokenizer")
        else:
            tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.tokenizer_sessions, cfg.phrasing)
        staging = run_dir / ".tokenizer-staging"
        tokenizer.save_pretrained(staging)
        staging.rename(path)
    return Qwen2Tokenizer.from_pretrained(path)


def build_reasoning_pipeline(text_encoder, tokenizer):
    """An EditR2Pipeline around `text_encoder` (its `reason()` is what the evaluation runs; the VAE and the
    transformer are tiny placeholders that reasoning never calls)."""
    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.testing import tiny_components, tiny_processor

    parts = tiny_components(0)
    pipe = EditR2Pipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=text_encoder,
                          tokenizer=tokenizer, processor=tiny_processor(tokenizer), transformer=parts["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def max_history_at(cfg: ReasonerConfig, step: int) -> int:
    for fraction, max_history in cfg.curriculum:
        if step < fraction * cfg.max_steps:
            return int(max_history)
    return cfg.max_turns


def draw_example(rng: random.Random, cfg: ReasonerConfig, max_history: int | None = None):
    """A random (session, 0-based turn) from the training seeds, with at most `max_history` earlier turns, in the
    config's `phrasing` ("seen": the training families only, `grammar_fraction` of them in the fixed grammar)."""
    from editr2.bench.shapes import generate_session

    if cfg.phrasing not in TRAIN_PHRASINGS:  # a config edited after construction
        raise ValueError(f"phrasing={cfg.phrasing!r}: pass one of {TRAIN_PHRASINGS}.")
    if cfg.cu_fraction == 0.5:  # the earlier runs' draw, kept so they reproduce
        family = rng.choice(("cm", "cu"))
    else:
        family = "cu" if rng.random() < cfg.cu_fraction else "cm"
    num_turns = rng.randint(1, cfg.max_turns)
    seed = common.TRAIN_SEED_OFFSET + rng.randrange(10**9)
    phrasing = cfg.phrasing
    if phrasing != "grammar" and cfg.grammar_fraction > 0 and rng.random() < cfg.grammar_fraction:
        phrasing = "grammar"
    session = generate_session(family, num_turns, seed, cfg.image_size, phrasing)
    limit = num_turns if max_history is None else min(num_turns, max_history + 1)
    return session, rng.randrange(limit)


def session_state(session, turn: int):
    """An `editr2.session.Session` as the pipeline sees it before 0-based `turn` (gold images)."""
    from editr2.session import Session, Turn

    state = Session(source_image=session.target_image(0))
    for t in range(turn):
        state = state.append(Turn(instruction=session.instruction[t], image=session.target_image(t + 1),
                                  intent=session.gold_intent[t]))
    return state


def collate(pipe, examples, condition_area: int, buckets: int = 1) -> dict | list[dict]:
    """Prompt (the pipeline's reasoning inputs) + target answer, right-padded; labels mask the prompt.

    `examples`: `(session state, instruction, answer)` or `(session state, instruction, answer, template)`.
    `buckets > 1`: the rows sorted by length and split into that many batches, each padded only to its own longest
    row (a list of batches; `step_loss` weighs them by their trained tokens, so the loss is the whole batch's)."""
    rows = [_encode(pipe, example, condition_area) for example in examples]
    if buckets <= 1:
        return _pad(pipe.tokenizer, rows)
    rows.sort(key=lambda row: len(row[0]))
    size = -(-len(rows) // buckets)
    return [_pad(pipe.tokenizer, rows[i: i + size]) for i in range(0, len(rows), size)]


def _encode(pipe, example, condition_area: int) -> tuple:
    """`(input ids, labels, pixel values, image grid)` of one example."""
    tokenizer = pipe.tokenizer
    state, instruction, answer, *template = example
    inputs = pipe.prepare_reasoning_inputs(state, instruction, template[0] if template else None,
                                           condition_area=condition_area, device="cpu")
    prompt = inputs["input_ids"][0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    target = torch.tensor(tokenizer(answer, add_special_tokens=False)["input_ids"] + [end])
    return (torch.cat([prompt, target]), torch.cat([torch.full_like(prompt, -100), target]),
            inputs["pixel_values"], inputs["image_grid_thw"])


def _pad(tokenizer, rows) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(ids) for ids, *_ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (x, y, *_) in enumerate(rows):
        input_ids[i, : len(x)], label_ids[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids,
            "pixel_values": torch.cat([row[2] for row in rows]), "image_grid_thw": torch.cat([row[3] for row in rows])}


def short_template_prob(cfg: ReasonerConfig, step: int) -> float:
    for fraction, probability in cfg.short_template:
        if step < fraction * cfg.max_steps:
            return float(probability)
    return 0.0


def aux_copy_size(cfg: ReasonerConfig, step: int) -> int:
    for fraction, size in cfg.aux_copy:
        if step < fraction * cfg.max_steps:
            return int(size)
    return 0


def copy_batch(tokenizer, cfg: ReasonerConfig, step: int, size: int) -> dict:
    """Synthetic copy sequences `filler x filler <sep> x` of ordinary tokens (random lengths, so only content-based
    copy heads solve them, not a fixed positional offset); the loss is on the copied `x`."""
    gen = common.step_generator(cfg.seed, step, "copy")
    first = len(tokenizer.get_added_vocab())  # special and think tokens come first in this vocabulary
    sep = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, labels = [], []
    for _ in range(size):
        n, before, after = (int(v) for v in torch.randint(1, cfg.aux_copy_length + 1, (3,), generator=gen))
        n = max(n, 3)
        x = torch.randint(first, len(tokenizer), (n,), generator=gen)
        filler = torch.randint(first, len(tokenizer), (before + after,), generator=gen)
        row = torch.cat([filler[:before], x, filler[before:], torch.tensor([sep]), x])
        rows.append(row)
        labels.append(torch.cat([torch.full((len(row) - n,), -100), x]))
    length = max(len(r) for r in rows)
    ids = torch.full((size, length), pad)
    label_ids = torch.full((size, length), -100)
    mask = torch.zeros((size, length), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], label_ids[i, : len(y)], mask[i, : len(r)] = r, y, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": label_ids}


def make_batch(pipe, cfg: ReasonerConfig, step: int) -> dict:
    """The step's SFT batch (CPU tensors; only the pipeline's processor is used, so data workers can build it)."""
    rng = common.step_rng(cfg.seed, step)
    examples = []
    for _ in range(cfg.batch_size):
        session, turn = draw_example(rng, cfg, max_history_at(cfg, step))
        history, instruction, answer = common.reasoning_example(session, turn, cfg.quote_edit)
        probability = short_template_prob(cfg, step)
        template = SHORT_TEMPLATE if probability > 0 and rng.random() < probability else request_template(cfg)
        examples.append((session_state(session, turn), instruction, answer, template))
    return collate(pipe, examples, cfg.condition_size**2, cfg.length_buckets)


def make_batches(pipe, cfg: ReasonerConfig, step: int) -> tuple[dict, dict | None]:
    """The step's SFT batch and its synthetic copy batch (None when the `aux_copy` schedule has ended)."""
    copy_size = aux_copy_size(cfg, step)
    copies = copy_batch(pipe.tokenizer, cfg, step, copy_size) if copy_size else None
    return make_batch(pipe, cfg, step), copies


def answer_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The causal-LM loss of `batch` (as `model(**batch).loss`: mean cross-entropy over the positions whose next
    label is not -100), with the LM head applied only at those positions (`reduction="sum"`: their sum)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    if not bool(keep.any()):
        raise ValueError("The batch has no trained position (every label is -100): pass answers to train on.")
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction=reduction)


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def step_loss(model, batch: dict | list[dict], cfg: ReasonerConfig) -> torch.Tensor:
    """The training loss of one batch (`answer_loss` when `cfg.answer_logits`, else the model's own); a list of
    length buckets (`collate`) gives the mean over all their trained tokens, as one padded batch would."""
    if isinstance(batch, list):
        total = sum(trained_tokens(b) for b in batch)
        return sum(answer_loss(model, b, reduction="sum") for b in batch) / total
    return answer_loss(model, batch) if cfg.answer_logits else model(**batch).loss


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(pipe, cfg: ReasonerConfig, num_sessions: int | None = None, num_turns: int | None = None,
             seed: int = 0, record: list | None = None) -> dict:
    """Greedy `pipe.reason()` on held-out sessions (seeds `seed..seed+n-1` per family): exact match of the intent,
    fallback rate, and the text-side intent score (`editr2.bench.intent_score`).

    With `phrasing: grammar` the result is `{cm, cu, exact_match}` on grammar sessions; with `phrasing: seen` it is
    the same on each of `EVAL_PHRASINGS` (`{"grammar": ..., "seen": ..., "unseen": ...}`, the held-out families
    under "unseen"), its top-level `exact_match` the unseen one.
    """
    num_sessions = num_sessions or cfg.eval_sessions
    num_turns = num_turns or cfg.eval_turns
    was_training = pipe.text_encoder.training
    pipe.text_encoder.eval()
    try:
        if cfg.phrasing == "grammar":
            return evaluate_phrasing(pipe, cfg, "grammar", num_sessions, num_turns, seed, record)
        out = {p: evaluate_phrasing(pipe, cfg, p, num_sessions, num_turns, seed, record) for p in EVAL_PHRASINGS}
        out["exact_match"] = out["unseen"]["exact_match"]
        return out
    finally:
        pipe.text_encoder.train(was_training)


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def evaluate_phrasing(pipe, cfg: ReasonerConfig, phrasing: str, num_sessions: int, num_turns: int, seed: int,
                      record: list | None = None, families: tuple[str, ...] = ("cm", "cu")) -> dict:
    """`evaluate` on sessions in one phrasing: per family the exact match (overall, per turn and per operation),
    fallbacks, objects resolved, rule kept (turns whose gold intent keeps the rule), and on everyday phrasing the
    exact match of the turns that name their target by a reference ("it", "the one you just added", "the earliest
    one", ...)."""
    from editr2.bench.intent_score import score_turn
    from editr2.bench.shapes import generate_session

    out = {}
    for family in families:
        exact, fallback, resolved, rule_kept, referenced = [], [], [], [], []
        per_turn = [[] for _ in range(num_turns)]
        per_op: dict[str, list] = {}
        for k in range(num_sessions):
            session = generate_session(family, num_turns, seed + k, cfg.image_size, phrasing)
            for t in range(num_turns):
                intent = pipe.reason(session_state(session, t), session.instruction[t],
                                     max_new_tokens=cfg.max_new_tokens, condition_area=cfg.condition_size**2,
                                     template=request_template(cfg))
                gold = session.gold_intent[t]
                ok = intent.text == gold
                exact.append(ok)
                per_turn[t].append(ok)
                per_op.setdefault(session.task_type[t], []).append(ok)
                fallback.append(intent.fallback_reason is not None)
                rule = session.rules[t] if phrasing != "grammar" else session.rule_color
                score = score_turn(intent.text, session.formatted_instruction[t], rule, t + 1)
                resolved.append(score.resolved)
                gold_score = score_turn(gold, session.formatted_instruction[t], rule, t + 1)
                keeps_rule = score.rule_kept is not None and gold_score.rule_kept
                if keeps_rule:
                    rule_kept.append(score.rule_kept)
                reference = session.references[t] if phrasing != "grammar" else None
                if reference in REFERENCE_KINDS:
                    referenced.append(ok)
                if record is not None:
                    record.append({"phrasing": phrasing, "family": family, "seed": seed + k, "turn": t + 1,
                                   "instruction": session.instruction[t], "gold": gold,
                                   "intent": intent.text, "reasoning": intent.reasoning, "exact": ok,
                                   "fallback": intent.fallback_reason, "operation": session.task_type[t],
                                   "words": session.phrasing_families[t] if session.phrasing_families else phrasing,
                                   "reference": reference, "rule_kept": bool(score.rule_kept) if keeps_rule else None})
        out[family] = {"exact_match": float(np.mean(exact)), "fallback": float(np.mean(fallback)),
                       "resolved": float(np.mean(resolved)), "rule_kept": _mean(rule_kept),
                       "exact_per_turn": [float(np.mean(x)) for x in per_turn]}
        if phrasing != "grammar":
            out[family]["reference_exact"] = _mean(referenced)
            out[family]["exact_per_op"] = {op: float(np.mean(v)) for op, v in sorted(per_op.items())}
    out["exact_match"] = float(np.mean([out[f]["exact_match"] for f in families]))
    return out


# How a turn of an everyday session names its target when it uses a reference (`ShapesSession.references`).
REFERENCE_KINDS = ("it", "last_added", "first_added", "first_edit", "other")


def describe_metrics(metrics: dict) -> str:
    """The console line of an evaluation."""
    if "unseen" not in metrics:
        return (f"exact {metrics['exact_match']:.3f} (cm {metrics['cm']['exact_match']:.3f}, "
                f"cu {metrics['cu']['exact_match']:.3f})")
    return ", ".join(f"{p} {metrics[p]['exact_match']:.3f}" for p in EVAL_PHRASINGS)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def build(cfg: ReasonerConfig, run_dir: Path):
    tokenizer = load_or_build_tokenizer(cfg, run_dir)
    common.seed_everything(cfg.seed)
    if cfg.base_run:
        from peft import LoraConfig
        from transformers import Qwen2_5_VLForConditionalGeneration

        if cfg.lora_rank <= 0:
            raise ValueError("base_run is set: pass lora_rank > 0 (the base stays frozen; only a LoRA trains).")
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(cfg.base_run) / "text_encoder")
        text_encoder.requires_grad_(False)
        text_encoder.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                            target_modules=LORA_TARGETS, lora_dropout=0.0),
                                 adapter_name=ADAPTER_NAME)
    else:
        text_encoder = common.build_text_encoder(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                                 cfg.num_kv_heads, cfg.intermediate_size, cfg.vision_hidden,
                                                 cfg.vision_depth)
        if cfg.init_from:  # a resumed run then loads its own checkpoint over these weights
            init_source(cfg)
            common.load_weights(text_encoder, cfg.init_from)
    return build_reasoning_pipeline(text_encoder, tokenizer)


def export(run_dir: Path, cfg: ReasonerConfig, pipe=None, final_sessions: int | None = None,
           device: torch.device | None = None) -> dict:
    """Save `RUN_DIR/{text_encoder,tokenizer_final,processor}` and `RUN_DIR/metrics.json` (a larger evaluation, on
    the device of `pipe`, or on `device` when the pipeline is loaded from the last checkpoint)."""
    if pipe is None:
        pipe = build(cfg, run_dir)
        if common.latest_checkpoint(run_dir) is None:
            raise ValueError(f"{run_dir} has no checkpoint to export: train first.")
        common.load_weights(pipe.text_encoder, common.latest_checkpoint(run_dir))
        pipe.to(device or "cpu")
    pipe.text_encoder.eval()
    if cfg.base_run:  # the base is unchanged: only the reasoning LoRA is new
        pipe.save_reasoning_lora(run_dir / "reasoning_lora", ADAPTER_NAME)
    else:
        pipe.text_encoder.save_pretrained(run_dir / "text_encoder")
        pipe.processor.save_pretrained(run_dir / "processor")
    record: list = []
    metrics = evaluate(pipe, cfg, num_sessions=final_sessions or cfg.final_sessions or 4 * cfg.eval_sessions, seed=0, record=record)
    state = json.loads((common.latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    metrics.update(step=state["step"], train_seconds=state.get("train_seconds"))
    common.write_json(run_dir / "metrics.json", metrics)
    common.write_json(run_dir / "eval_samples.json", record)
    return metrics


def train(cfg: ReasonerConfig, run_dir: str | Path, show_progress: bool = True, final_sessions: int | None = None,
          stop_after: int | None = None):
    """Train (or resume) in `run_dir`, then export and evaluate; returns the final metrics (None when stopped by
    `stop_after`, which checkpoints and returns after that step, as an interruption would)."""
    run = common.Run(cfg, run_dir, "reasoner", show_progress, stop_after)
    pipe = build(cfg, run.run_dir).to(run.device)  # built on the CPU (the same init everywhere), then moved
    model = pipe.text_encoder.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    model, optimizer = run.prepare(model, torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                                             {"params": no_decay, "weight_decay": 0.0}],
                                                            lr=cfg.lr, betas=(0.9, 0.98)))
    accelerator = run.accelerator
    for step, (batch, copies) in run.steps(lambda step: make_batches(pipe, cfg, step)):
        common.set_lr(optimizer, common.lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps))
        with accelerator.autocast():
            loss = step_loss(model, batch, cfg)
            copy_loss = step_loss(model, copies, cfg) if copies is not None else None
        if copy_loss is not None:
            loss = loss + copy_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
        optimizer.step()
        done = step + 1
        copy_value = copy_loss.item() if copy_loss is not None else None
        row = {"loss": loss.item() - (copy_value or 0.0), "copy_loss": copy_value, "grad_norm": float(grad_norm),
               "lr": optimizer.param_groups[0]["lr"]}
        if run.end_step(done, row, lambda: evaluate(pipe, cfg, seed=1_000_000),  # held out from the final evaluation
                        done % cfg.eval_every == 0 and done != cfg.max_steps,
                        describe=describe_metrics):
            break
    if run.interrupted:
        return None
    return export(run.run_dir, cfg, pipe, final_sessions)


def main(argv=None) -> int:
    cfg, args = common.parse_args(ReasonerConfig, "reasoner_short.yaml", argv)
    if args.export_only:
        metrics = export(Path(args.run_dir), cfg, device=common.make_accelerator(cfg).device)
    else:
        metrics = train(cfg, args.run_dir, not args.no_progress, stop_after=args.stop_after)
        if metrics is None:
            print(f"stopped after step {args.stop_after}; run the same command again to resume")
            return 0
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
