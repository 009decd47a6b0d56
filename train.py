"""Lesson 5 — training: the whole loop in plain code.

What you will learn here, numbered as the section banners:
  1. the settings of a run — each with its default and its meaning, in one place that the
     command line reads too — and the defaults each model size trains with;
  2. device and precision: bfloat16 or float16 autocast, and why float16 needs a GradScaler
     while bfloat16 does not;
  3. the optimizers — AdamW (weight decay only on matrices), and Muon, which orthogonalises each
     hidden matrix's update — and the learning-rate schedule (linear warm-up, then cosine decay);
  4. one optimisation step: gradient accumulation over micro-batches, unscaling, clipping;
  5. evaluation in nats/token, perplexity and bits per byte (comparable across tokenizers);
  6. the checkpoint: one function builds it and says who reads each key; putting it back so a
     resumed run goes on exactly as if it had never stopped;
  7. the run: set up (fresh, resumed, or started from another model's weights), then the loop
     itself — a visible `while` that evaluates, saves, steps and logs; no trainer class. Chat
     tuning is this same run on conversations: data.load_split hands it rows that each begin
     one, with the questions masked out of the loss (data.py, section 6).
Optional sections, for a second reading:
  8. (optional) progress you can watch: log.jsonl, loss.svg, a sample while it trains;
  9. (optional) the run folder: one run at a time (an OS lock), a log that rewinds on resume,
     and clean stops on Ctrl-C / SIGTERM;
 10. (optional) several processes: DDP under torchrun, on one machine or several;
 11. (optional) the command line: a flag for every setting, and what --resume and --init_from
     take from a checkpoint.

You need: gpt.py (the model, GPT.from_checkpoint, bits_per_byte), bpe.py (tokenizers, and what
every command line shares: one-line errors, pick_device, read_checkpoint), data.py (prepare,
token files and batches).
Next lesson: sample.py turns the checkpoint this file writes back into text.

    python train.py --model_type gpt-micro --dataset chinese --max_iters 2000
    python train.py --resume --out_dir checkpoints/gpt-micro --max_iters 4000
    python train.py --init_from checkpoints/gpt-micro/best_model.pt --dataset my.txt --out_dir mine
    python train.py --init_from checkpoints/gpt-micro/best_model.pt --dataset zh_idioms \
        --out_dir checkpoints/chat                                    # chat tuning
    torchrun --nproc_per_node 2 train.py --model_type gpt-mini --dataset chinese
"""
import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import pathlib
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import data
from bpe import InputError
from gpt import GPT, PRESETS, GPTConfig, bits_per_byte

try:
    import fcntl                             # the OS file lock of Linux and macOS (section 9)
except ImportError:                          # Windows
    fcntl = None


# ----------------------------------------------------------------------------------------------
# 1. Settings and defaults
# ----------------------------------------------------------------------------------------------
# Every setting of a run, once: its name, its default, what it means, and how the command line
# checks it (section 11 makes a flag `--name value` of each). A checkpoint stores them all, so
# that --resume goes on with exactly these. A default of None means "the model size's own"
# (PRESET_DEFAULTS below) or is explained beside it.

def setting(default, meaning, **flag):
    """A field of Settings: its default, its meaning (the flag's --help), and argparse's checks."""
    return dataclasses.field(default=default, metadata=dict(help=meaning, **flag))


COUNT = bpe.number_flag(int, "≥ 1", lambda n: n >= 1)                # argparse `type=` checks
WHOLE = bpe.number_flag(int, "≥ 0", lambda n: n >= 0)
POSITIVE = bpe.number_flag(float, "> 0", lambda x: x > 0)
NON_NEGATIVE = bpe.number_flag(float, "≥ 0", lambda x: x >= 0)
FRACTION = bpe.number_flag(float, "in [0, 1)", lambda x: 0 <= x < 1)


@dataclasses.dataclass
class Settings:
    # what to train, on what
    model_type: str = setting("gpt-micro", "a size from gpt.PRESETS", choices=list(PRESETS))
    dataset: str = setting("chinese", "a built-in name (data.DATASETS), a .txt/.jsonl/.json file "
                                      "or a folder of them, or NAME for data/raw/NAME/")
    tokenizer: str = setting(data.DEFAULT_TOKENIZER, "bpe (ours, trained on the dataset), gpt2, "
                                                     "cl100k_base, or a saved BPE's path")
    vocab_size: int = setting(data.DEFAULT_VOCAB_SIZE, "our BPE's vocabulary (with bpe)",
                              type=bpe.VOCAB_SIZE_FLAG)
    data_dir: str = setting("data", "raw downloads and token files", type=bpe.folder_flag)
    max_mb: float = setting(None, "use only this many MB of the text (None: all of it)",
                            type=bpe.MAX_MB_FLAG)
    num_proc: int = setting(None, "tokenizing threads (None: every core)", type=COUNT)
    # the model
    block: str = setting(None, "gpt2 (GPT-2's block) or llama (RMSNorm, RoPE, SwiGLU, GQA)",
                         choices=["gpt2", "llama"])
    n_kv_head: int = setting(None, "the llama block's key/value heads (None: one per head)",
                             type=COUNT)
    block_size: int = setting(None, "the context, in tokens", type=COUNT)
    dropout: float = setting(0.0, "0 to pre-train on plenty of data; 0.1–0.2 on little",
                             type=FRACTION)
    bias: int = setting(1, "1: biases in Linear layers and LayerNorms (GPT-2's block); 0: none",
                        type=int, choices=[0, 1])
    # how long, in what batches, at what learning rate
    max_iters: int = setting(None, "optimizer steps (given with --epochs, this wins)", type=COUNT)
    epochs: float = setting(None, "passes over the training tokens, instead of --max_iters",
                            type=POSITIVE)
    batch_size: int = setting(None, "sequences per micro-batch, per process", type=COUNT)
    grad_accum: int = setting(1, "micro-batches per optimizer step (the second name is LLM "
                                 "Learning's)", type=COUNT,
                              aliases=["--gradient_accumulation_steps"])
    optimizer: str = setting(None, "adamw, or muon for the blocks' matrices (+ adamw for the rest)",
                             choices=["adamw", "muon"])
    lr: float = setting(None, "peak learning rate (AdamW's)", type=POSITIVE)
    muon_lr: float = setting(0.02, "Muon's peak learning rate", type=POSITIVE)
    min_lr: float = setting(None, "the end of the cosine (None: lr / 10)", type=NON_NEGATIVE)
    warmup_iters: int = setting(None, "steps of linear warm-up", type=WHOLE)
    lr_decay_iters: int = setting(None, "the cosine's length (None: the whole run)", type=COUNT)
    weight_decay: float = setting(0.1, "AdamW's (and Muon's), on matrices only",
                                  type=NON_NEGATIVE)
    beta2: float = setting(None, "AdamW's β2", type=FRACTION)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: never)", type=NON_NEGATIVE)
    # where, and how fast
    dtype: str = setting("auto", "autocast precision (auto: bfloat16, or float16 where it has "
                                 "none, on a CUDA GPU; float32 elsewhere)",
                         choices=["auto", "float32", "bfloat16", "float16"])
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps",
                          type=bpe.device_flag)
    compile: bool = setting(False, "torch.compile the model (faster on a GPU, after a warm-up)")
    # watching it learn
    eval_interval: int = setting(250, "evaluate and save every N steps", type=COUNT)
    eval_iters: int = setting(20, "batches per evaluation", type=COUNT)
    log_interval: int = setting(10, "a progress line every N steps", type=COUNT)
    sample_every: int = setting(0, "print a sample at every N-th evaluation (0: never)", type=WHOLE)
    sample_prompt: str = setting(None, "its prompt (None: the validation text's first line)")
    sample_tokens: int = setting(60, "its length in tokens", type=COUNT)
    # where it goes
    out_dir: str = setting(None, "the run folder (None: checkpoints/<model_type>)",
                           type=bpe.folder_flag)
    seed: int = setting(1337, "seeds the weights, the data order and dropout", type=int)


# What each size trains with. nano/micro/mini are sized for a CPU (minutes to an hour); gpt-small
# and the GPT-2 sizes want a GPU (for GPT-2's ~0.5M tokens a step: --grad_accum 40 on one GPU, 5 on
# eight — ours is per process; nanoGPT divides its 40 among them). The small sizes take the llama
# block with Muon, at the learning rate and warm-up that won bench.py's equal-time comparison on
# gpt-micro with its batch of 16 (README, "Measured results": the rows run with no flags); nano and
# mini take gpt-micro's rates untested, gpt-small a GPU's. The gpt2* sizes keep GPT-2's block and
# AdamW, comparable with GPT-2 and nanoGPT.
# β2 = 0.99 averages the squared gradients over ~100 steps, steadier for the small, noisy batches
# of a CPU run; big batches take nanoGPT's 0.95.
SMALL = dict(block="llama", optimizer="muon", beta2=0.99, lr=2e-3, warmup_iters=50)
GPT2 = dict(block="gpt2", optimizer="adamw", beta2=0.95, warmup_iters=2000, max_iters=600000,
            block_size=1024)
PRESET_DEFAULTS = {
    "gpt-nano":    dict(SMALL, block_size=64,  batch_size=32, max_iters=2000),
    "gpt-micro":   dict(SMALL, block_size=128, batch_size=16, max_iters=5000),
    "gpt-mini":    dict(SMALL, block_size=256, batch_size=16, max_iters=5000),
    "gpt-small":   dict(SMALL, block_size=512, batch_size=16, max_iters=20000, lr=6e-4,
                        warmup_iters=500),
    "gpt2":        dict(GPT2, batch_size=12, lr=6e-4),
    "gpt2-medium": dict(GPT2, batch_size=12, lr=3e-4),
    "gpt2-large":  dict(GPT2, batch_size=8,  lr=2.5e-4),
    "gpt2-xl":     dict(GPT2, batch_size=4,  lr=2e-4),
}


def new_settings(**given):
    """A new run's settings: those given, else the model size's, else Settings' own defaults."""
    preset = dict(PRESET_DEFAULTS[given.get("model_type", Settings.model_type)])
    if "epochs" in given:
        del preset["max_iters"]                  # --epochs sets the length instead
    settings = Settings(**{**preset, **given})
    settings.out_dir = settings.out_dir or os.path.join("checkpoints", settings.model_type)
    n_head = PRESETS[settings.model_type]["n_head"]        # checked now, not after tokenizing
    if settings.n_kv_head is not None and n_head % settings.n_kv_head:
        raise InputError(f"--n_kv_head {settings.n_kv_head} does not divide the {n_head} heads of "
                         f"{settings.model_type} — use one of "
                         f"{[k for k in range(1, n_head + 1) if n_head % k == 0]}")
    return settings


# ----------------------------------------------------------------------------------------------
# 2. Device and precision
# ----------------------------------------------------------------------------------------------

def pick_dtype(name, device):
    """--dtype auto: on a CUDA GPU bfloat16 if supported, else float16; float32 elsewhere.

    bfloat16 keeps float32's 8 exponent bits (same range, fewer digits), so gradients never
    underflow. float16 has only 5 exponent bits: small gradients round to 0, which is why it
    needs a GradScaler (see optimizer_step).
    """
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast_context(device, dtype):
    """Matmuls in the low-precision dtype, reductions (softmax, loss) kept in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------------------
# 3. Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------------

# Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-schulz") for the hidden matrices.
# A gradient matrix G = U·S·Vᵀ is dominated by a few directions with large singular values; Adam
# and SGD move the weights mostly along those. Muon replaces G by U·Vᵀ — every singular value set
# to 1 — so each step moves the matrix the same amount in every direction it has signal in.
# U·Vᵀ comes from a few Newton–Schulz iterations X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X — matmuls only —
# which push every singular value of X (first scaled to at most 1) towards 1; the coefficients
# (3.4445, −4.7750, 2.0315) are tuned to get there in 5 steps, roughly (values end between about
# 0.5 and 1.5, which trains just as well). bfloat16 is precise enough for that.
# Embeddings, the output layer and the gains are no hidden matrices: they stay with AdamW.

def orthogonalise(G, steps=5, dtype=torch.bfloat16):
    """≈ U·Vᵀ for G = U·S·Vᵀ (2-D), by Newton–Schulz iterations in `dtype`."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T                                  # iterate on the wide side: XXᵀ is the small one
    X = X / X.norm().clamp(min=1e-7)             # ‖X‖_F ≥ its largest singular value: now all ≤ 1
    for _ in range(steps):
        # torch.addmm(M, P, Q, beta=β, alpha=α) = β·M + α·P@Q in one kernel, rounded once
        A = X @ X.T                              # (rows, rows)
        B = torch.addmm(A, A, A, beta=b, alpha=c)             # b·A + c·A²
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X: each singular value s → a·s + b·s³ + c·s⁵
    return X.T if tall else X


# Which dtype to iterate in: bfloat16 halves the work where the hardware multiplies bfloat16 —
# NVIDIA GPUs, and CPUs with the AVX512-BF16 instructions (torch asks the CPU which it has).
# Elsewhere (most laptops: AVX2 only) torch emulates bfloat16, 15–46× slower than float32, and
# Muon's step would cost more than the model's. The answer is the machine's and the device's, so
# every process of a run, and a run resumed on the same kind of machine, iterates alike.

def newton_schulz_dtype(device_type):
    """bfloat16 on CUDA and on a CPU with native bfloat16 matmuls; float32 elsewhere."""
    if device_type == "cuda" or (device_type == "cpu" and torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then each update orthogonalised; for 2-D weights only. ns_dtype: the
    Newton–Schulz dtype (None: newton_schulz_dtype decides for the weights' device)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_dtype=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:               # the first step: no history
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - mu)                  # m ← μ·m + (1 − μ)·g: recent gradients
                # Nesterov: (1 − μ)·g + μ·m, a step ahead
                update = orthogonalise(p.grad.lerp(m, mu),
                                       dtype=self.ns_dtype or newton_schulz_dtype(p.device.type))
                p.mul_(1 - lr * group["weight_decay"])   # decoupled weight decay, as AdamW's
                # U·Vᵀ of a (rows, cols) matrix has entries of size ~1/√max(rows, cols); a tall
                # one gets √(rows/cols) more, so that every update's entries are ~1/√cols (1 over
                # the square root of its fan-in), whatever the matrix's shape.
                p.add_(update, alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)


def make_optimizers(model, settings):
    """[AdamW] for every weight — or, with --optimizer muon, [Muon for the blocks' matrices, AdamW
    for the rest: the embedding (which is also the output layer), the gains and biases].

    AdamW decays 2-D weights only: decay pulls weights towards 0, a regulariser for the matrices
    that do the work; biases and norm gains are few, scale-setting parameters, and decaying them
    only hurts.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def hidden(name, p):
        return settings.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2
    rest = [p for name, p in named if not hidden(name, p)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # fused=True: one kernel updates every tensor instead of a loop of small ops per tensor (on
    # CUDA, Apple's MPS and the CPU alike, in the torch versions requirements.txt asks for).
    adamw = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, settings.beta2), fused=True)
    if settings.optimizer != "muon":
        return [adamw]
    matrices = [p for name, p in named if hidden(name, p)]
    return [Muon(matrices, lr=settings.muon_lr, weight_decay=settings.weight_decay), adamw]


def learning_rate(it, settings, total_iters):
    """Linear warm-up to lr over warmup_iters (lr/warmup_iters at step 0: a step at 0 would do
    nothing), then cosine decay to min_lr.

    Warm-up: Adam's moment estimates are noisy for the first steps, and large early updates can
    wreck the fresh model. Cosine: big steps while far from a minimum, small steps to settle into
    it; lr(t) = min_lr + ½(1 + cos(π·t))·(lr − min_lr), t going 0 → 1.
    """
    lr, warmup = settings.lr, settings.warmup_iters
    min_lr = lr / 10 if settings.min_lr is None else settings.min_lr
    if it < warmup:
        return lr * (it + 1) / warmup
    decay_iters = settings.lr_decay_iters or total_iters
    if it >= decay_iters:
        return min_lr
    t = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (lr - min_lr)


def set_learning_rate(optimizers, it, settings, total_iters):
    """Put step `it`'s rate into every optimizer, and return AdamW's (the one the log shows).
    Muon follows the same curve from its own peak: AdamW's rate × muon_lr / lr."""
    lr = learning_rate(it, settings, total_iters)
    for optimizer in optimizers:
        scale = settings.muon_lr / settings.lr if isinstance(optimizer, Muon) else 1
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
    return lr


# ----------------------------------------------------------------------------------------------
# 4. One optimisation step
# ----------------------------------------------------------------------------------------------

def forward_backward(model, next_batch, grad_accum, autocast_ctx, scaler, ddp=False):
    """Run grad_accum micro-batches, accumulating their gradients; return the mean loss.

    Gradients add up across backward() calls. Each micro-batch's loss is a *mean* over its tokens,
    so dividing it by grad_accum makes the sum of the micro-gradients equal the gradient of the
    mean over the whole (batch_size × grad_accum) batch — the same step one big batch would take,
    in a fraction of the memory.
    """
    total = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()
        # DDP all-reduces gradients inside backward(); doing that once, on the last micro-batch,
        # instead of after every one, saves grad_accum − 1 rounds of communication.
        last = micro == grad_accum - 1
        with contextlib.nullcontext() if (last or not ddp) else model.no_sync():
            with autocast_ctx:
                _, loss = model(x, y)
            loss = loss / grad_accum
            # The scaler multiplies the loss by S (e.g. 65536) so float16 gradients stay above
            # underflow; it divides them back before the optimizer sees them.
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


def optimizer_step(model, optimizers, scaler, grad_clip):
    """Unscale, clip, step, update the scale. Returns (grad norm, whether the step was taken)."""
    # Clipping must see the true gradients, so unscale first (a no-op without float16).
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"))
    scale_before = scaler.get_scale()
    # With float16 an inf/NaN gradient means the scale was too high: the scaler skips the step
    # and halves S. With bfloat16/float32 the scaler is disabled and always steps.
    for optimizer in optimizers:
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    stepped = not scaler.is_enabled() or scaler.get_scale() >= scale_before
    return norm, stepped


# ----------------------------------------------------------------------------------------------
# 5. Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, splits, settings, device, autocast_ctx, seed):
    """Mean loss over eval_iters batches of each split's windows, drawn at random, in nats/token.

    The batches come from a generator with a fixed seed, never from the global RNG: every
    evaluation then measures the same batches (so "best" means better, not luckier), and it
    cannot shift the random numbers the training draws (dropout) — which is what keeps a resumed
    run identical to an uninterrupted one.
    """
    model.eval()
    out = {}
    for split, rows in splits.items():
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(settings.eval_iters)
        for i in range(settings.eval_iters):
            x, y = data.get_batch(rows, settings.batch_size, g, device)
            with autocast_ctx:
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# ----------------------------------------------------------------------------------------------
# 6. The checkpoint
# ----------------------------------------------------------------------------------------------
# A checkpoint is one dict that torch.load(path, weights_only=True) can read: tensors and plain
# Python (dict, list, str, int, float) only, never a pickled class (bpe.read_checkpoint says why).

PROGRESS_KEYS = ("iter_num", "best_val_loss", "history", "init_from", "data_tokenizer")


def make_checkpoint(model, optimizers, scaler, batches, settings, tokenizer, progress, chat):
    """Everything a run is, at this moment, as one dict:

    key            what it holds                                      who reads it
    model          the bare GPT's weights (a state dict)              sample.py, --resume, init_from
    model_config   GPTConfig's fields: the model's shape              sample.py, --resume, init_from
    tokenizer      bpe.tokenizer_entry: a name, or our BPE whole      sample.py, --resume, init_from
    optimizer      each optimizer's state: AdamW's moments, Muon's    --resume
                   momentum
    scaler         the float16 GradScaler's state, or None            --resume
    iter_num       optimizer steps taken                              --resume; --init_from notes it
    best_val_loss  the lowest val loss so far, nats/token             --resume
    train_args     every setting of the run (Settings)                --resume, init_from, sample.py
    rng            torch's CPU and CUDA generators (dropout's)        --resume
    data_state     where the batch iterator stands (BatchIterator)    --resume
    history        (iteration, loss) of every evaluation: loss.svg    --resume
    init_from      {"path", "iter_num"} of the checkpoint this run    a record for you
                   started from (--init_from), or None
    data_tokenizer what prepare() was given (tokenizer_for)           --resume: the same data
    chat           whether it was trained on conversations            sample.py --chat

    (PROGRESS_KEYS are the run's own record: `progress`, which restore gives back.)
    """
    return {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": bpe.tokenizer_entry(tokenizer),
        "optimizer": [optimizer.state_dict() for optimizer in optimizers],
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "train_args": dataclasses.asdict(settings),
        "rng": {"torch": torch.get_rng_state(),
                # the current GPU's. Only rank 0 saves, and every rank restores its state: all
                # ranks were seeded alike and draw alike, so their generators were equal anyway.
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        "data_state": batches.state_dict(),
        **progress,
        "chat": chat,
    }


def save_checkpoint(checkpoint, path):
    """torch.save under a temporary name, then a rename (bpe.atomic_path): the file at `path` is
    the old checkpoint until the new one is whole. A failed save (disk full, no permission) is
    one line, with the old file untouched and the temporary one removed."""
    try:
        with bpe.atomic_path(path) as temp:
            torch.save(checkpoint, temp)
    except (OSError, RuntimeError) as e:
        raise InputError(f"could not save {path} ({str(e).strip()[:100]}) — is "
                         f"{pathlib.Path(path).parent} full or read-only? The checkpoint already "
                         f"there is untouched") from None


def restore(ckpt, optimizers, scaler, batches):
    """--resume: put back what make_checkpoint saved (the weights are back already: the model
    was built from this checkpoint), so the run continues exactly; return its progress."""
    for optimizer, state in zip(optimizers, ckpt["optimizer"]):
        optimizer.load_state_dict(state)
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    batches.load_state_dict(ckpt["data_state"])
    # Last, the generators dropout draws from: its next masks are then exactly those the
    # uninterrupted run would have drawn. (The batches need none: BatchIterator's order is seeded.)
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return {key: ckpt[key] for key in PROGRESS_KEYS}


# ----------------------------------------------------------------------------------------------
# 7. The run
# ----------------------------------------------------------------------------------------------

def tokenizer_for(settings, resume, start):
    """What prepare() is given, so the data is tokenized as the model reads it: --tokenizer for a
    new run (a saved BPE's file read now, so that it need not stay), the checkpoint's own for a run
    begun from one (--init_from). A resumed run gives what its first start gave (the checkpoint's
    data_tokenizer), and so finds the very data folder it wrote."""
    if resume:
        return bpe.tokenizer_from_entry(resume["data_tokenizer"])
    if start:
        return bpe.tokenizer_from_entry(start["tokenizer"])
    return "bpe" if settings.tokenizer == "bpe" else bpe.load_tokenizer(settings.tokenizer)


def set_up_device(settings):
    """This process's place in the run (§ 10), its device and its autocast dtype:
    (rank, local_rank, world, device, dtype)."""
    rank, local_rank, world, device = setup_distributed(bpe.pick_device(settings.device))
    if device.startswith("cuda"):
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, ~8× faster, and
        # precise enough for training.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, local_rank, world, device, pick_dtype(settings.dtype, device)


def load_data(settings, given, resume, local_rank, world):
    """Tokenize the dataset with `given` (data.prepare; nothing to do if done before) and read it
    back: (the folder's tokenizer, its meta.json, {"train": Rows, "val": Rows}). Each machine's
    first process reports on its data."""
    # Once per machine (§ 10): its first process prepares while the others wait at the barrier,
    # then their own prepare() finds the folder done.
    if local_rank != 0:
        dist.barrier()
    folder = data.prepare(settings.dataset, given, settings.data_dir, settings.max_mb,
                          settings.num_proc, settings.vocab_size, verbose=local_rank == 0)
    if local_rank == 0 and world > 1:
        dist.barrier()
    tokenizer, meta = data.folder_tokenizer(folder), data.load_meta(folder)
    if resume is not None and bpe.tokenizer_from_entry(resume["tokenizer"]) != tokenizer:
        raise InputError(f"{folder} now holds another tokenizer than {resume['path']}: the "
                         f"text changed since — resume with the text as it was, or start a new run")
    # windows of the token files as Rows; in chat data each row begins a conversation
    splits = {split: data.load_split(folder, split, settings.block_size, verbose=local_rank == 0)
              for split in ("train", "val")}
    return tokenizer, meta, splits


def build_model(settings, vocab_size, ckpt=None):
    """A new GPT of the model size's shape, or a checkpoint's shape and weights (--resume,
    --init_from); either way with a row for each of the data's `vocab_size` ids."""
    if ckpt is None:
        model = GPT(GPTConfig.from_preset(settings.model_type, vocab_size=vocab_size,
                                          block_size=settings.block_size, dropout=settings.dropout,
                                          bias=bool(settings.bias), block=settings.block,
                                          n_kv_head=settings.n_kv_head))
    else:
        try:
            model = GPT.from_checkpoint(ckpt, block_size=settings.block_size,
                                        dropout=settings.dropout)
        except ValueError as e:                  # weights that do not fit its own model_config
            raise InputError(f"{ckpt['path']}: {e}") from None
    if model.config.vocab_size < vocab_size:     # chat data brought the template's two tokens
        model.grow_vocab(vocab_size)
    return model


def train(settings, resume=None, start=None):
    """A whole training run; returns {"iter_num", "best_val_loss", "history"}.

    resume: the checkpoint of the run to continue (out_dir/last.pt); start: a checkpoint whose
    weights, shape and tokenizer a new run begins from (--init_from), its "path" added.
    """
    out = pathlib.Path(settings.out_dir)
    with claim_out_dir(out, resume is not None):  # the run folder is ours: checked, locked (§ 9)
        # --- set up: where, the data, the model, the optimizers --------------------------------
        rank, local_rank, world, device, dtype = set_up_device(settings)
        master = rank == 0                       # only the first process logs and saves
        # The weights' initialisation and dropout draw from torch's global generator: seeding it
        # makes a run repeatable, and the checkpoint's "rng" carries it on across a resume. Every
        # process takes the same seed, so one saved state fits them all; with --dropout they then
        # draw the same masks (nanoGPT offsets the seed per process; at dropout 0, no difference).
        torch.manual_seed(settings.seed)
        # The data first: the model's vocabulary is the size of the tokenizer it was written with.
        given = tokenizer_for(settings, resume, start)
        tokenizer, meta, splits = load_data(settings, given, resume, local_rank, world)
        batches = data.BatchIterator(splits["train"], settings.batch_size, seed=settings.seed,
                                     rank=rank, world_size=world, device=device)
        model = build_model(settings, meta["vocab_size"], resume or start).to(device)
        optimizers = make_optimizers(model, settings)
        # The scaler is only active for float16; for other dtypes every call passes straight on.
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=(dtype == "float16"))
        progress = {"iter_num": 0, "best_val_loss": float("inf"),
                    "history": {"train": [], "val": []},
                    "init_from": start and {"path": str(start["path"]),
                                            "iter_num": start["iter_num"]},
                    "data_tokenizer": bpe.tokenizer_entry(given)}
        if resume is not None:
            progress = restore(resume, optimizers, scaler, batches)
            if master:
                rewind_log(out / "log.jsonl", progress["iter_num"])
                print(f"resumed from {resume['path']} at iteration {progress['iter_num']}")
        steps_per_epoch = batches.batches_per_epoch / settings.grad_accum   # optimizer steps
        total_iters = settings.max_iters or max(1, round(settings.epochs * steps_per_epoch))
        history = progress["history"]
        # The model the loop calls: compiled and/or in DDP (§ 10). `model` stays the bare GPT:
        # what we save and sample from.
        wrapped = wrap_model(model, settings.compile, world, device)
        autocast_ctx = autocast_context(device, dtype)
        tokens_per_step = settings.batch_size * settings.block_size * settings.grad_accum * world
        if master:
            print(f"model {settings.model_type}: {model.num_params(False) / 1e6:.2f}M parameters, "
                  f"vocab {model.config.vocab_size}, context {model.config.block_size} | device "
                  f"{device}, {dtype} | {tokens_per_step:,} tokens/step, "
                  f"{int(steps_per_epoch)} steps/epoch, {total_iters} steps")

        # --- the loop ---------------------------------------------------------------------------
        # At each iteration first evaluate (every eval_interval steps), then stop or take a step.
        # Evaluating first means iteration 0 measures the model as it starts, and the last
        # evaluation sees the final weights.
        stopping, since, since_it = False, time.time(), progress["iter_num"]   # for tokens/s
        with StopFlag() as stop:                 # Ctrl-C / SIGTERM: finish the step, then save
            while True:
                it = progress["iter_num"]
                due = it % settings.eval_interval == 0 or it == total_iters
                # (a resumed run starts where its last evaluation was made and saved: not again)
                if due and not (history["val"] and history["val"][-1][0] == it):
                    losses = estimate_loss(wrapped, splits, settings, device, autocast_ctx,
                                           seed=settings.seed + 1000 * rank)
                    losses = average_across_ranks(losses, world, device)
                    if not math.isfinite(losses["train"] + losses["val"]):
                        raise diverged(losses["val"], progress, settings)
                    history["train"].append((it, losses["train"]))
                    history["val"].append((it, losses["val"]))
                    if master:
                        # last.pt is always the newest state (to resume from); best_model.pt the
                        # one with the lowest val loss (to sample from): on a small dataset the
                        # model can get worse as it memorises.
                        improved = losses["val"] < progress["best_val_loss"]
                        progress["best_val_loss"] = min(progress["best_val_loss"], losses["val"])
                        log_eval(out, it, batches.epoch, losses, meta)
                        checkpoint = make_checkpoint(model, optimizers, scaler, batches, settings,
                                                     tokenizer, progress, meta["chat"])
                        save_checkpoint(checkpoint, out / "last.pt")
                        if improved:
                            save_checkpoint(checkpoint, out / "best_model.pt")
                        write_loss_svg(out / "loss.svg", history["train"], history["val"])
                        evaluation = len(history["val"]) - 1         # its number: 0, 1, 2, …
                        if settings.sample_every and evaluation % settings.sample_every == 0:
                            sample_while_training(model, tokenizer, splits["val"], settings, it,
                                                  out, meta["chat"])
                    since, since_it = time.time(), it    # tokens/s counts training time only
                if it >= total_iters or stopping:
                    break
                # one optimisation step
                lr = set_learning_rate(optimizers, it, settings, total_iters)
                loss = forward_backward(wrapped, batches.next_batch, settings.grad_accum,
                                        autocast_ctx, scaler, ddp=world > 1)
                norm, stepped = optimizer_step(wrapped, optimizers, scaler, settings.grad_clip)
                # loss.item() waits for the step to finish: on a GPU, one pause a step before the
                # next is queued (nanoGPT waits only every log_interval steps), for an answer at
                # once to "diverged?" and "stop?". Every process must stop at the same step, or
                # the others would wait for it in the next all-reduce: one average settles both
                # (any signal makes "stop" > 0, any NaN makes the mean NaN) (§ 10).
                mean = average_across_ranks({"loss": loss.item(), "stop": stop.requested},
                                            world, device)
                loss, stopping = mean["loss"], mean["stop"] > 0
                # A NaN loss means training diverged: stop at once. With float16 it can be a
                # passing overflow, which the scaler handles by skipping the step; there the next
                # evaluation gives the verdict.
                if not math.isfinite(loss) and dtype != "float16":
                    raise diverged(loss, progress, settings)
                progress["iter_num"] = it = it + 1
                if it % settings.log_interval == 0:
                    seconds_per_step = (time.time() - since) / max(1, it - since_it)
                    since, since_it = time.time(), it
                    if master:
                        log_step(out, it, total_iters, batches.epoch, loss, lr, norm, stepped,
                                 tokens_per_step / seconds_per_step, seconds_per_step, model,
                                 device, world)

        # --- the end: where the checkpoints are, or how to resume a stopped run -----------------
        if master and stopping and progress["iter_num"] < total_iters:
            save_checkpoint(make_checkpoint(model, optimizers, scaler, batches, settings, tokenizer,
                                            progress, meta["chat"]), out / "last.pt")
            launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
            print(f"stopped at iteration {progress['iter_num']}; saved {out / 'last.pt'}. Resume "
                  f"with:\n  {launcher} train.py --resume --out_dir {out}")
        elif master:
            print(f"done: {progress['iter_num']} iterations, best val loss "
                  f"{progress['best_val_loss']:.4f}; checkpoints in {out} — sample with: "
                  f"python sample.py --checkpoint {out / 'best_model.pt'}")
        leave_distributed()
    return {key: progress[key] for key in ("iter_num", "best_val_loss", "history")}


def diverged(loss, progress, settings):
    """The error for a NaN or infinite loss: nothing more is saved, and the last good checkpoint
    stays."""
    saved = progress["history"]["val"][-1][0] if progress["history"]["val"] else 0
    return InputError(f"loss is {loss} at iteration {progress['iter_num']} — training diverged. "
                      f"Nothing was saved after iteration {saved}; try a lower --lr (now "
                      f"{settings.lr}) or --dtype float32/bfloat16")


# ----------------------------------------------------------------------------------------------
# 8. (optional) Progress you can watch: log lines, log.jsonl, loss.svg, samples while training
# ----------------------------------------------------------------------------------------------
# What it adds: what a person watches during a run. Nothing here changes the training: it reads
# the run and writes text (and sampling uses a random generator of its own).

# MFU, model FLOPs utilisation: the FLOP/s the model's arithmetic needs at the measured tokens/s,
# as a share of what the GPU could do. 30–50 % is good for a GPT of this size. The peaks: dense
# bf16/fp16 tensor-core FLOP/s from the vendors' data sheets (no sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
                  "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def gpu_peak_flops(device):
    """The GPU's bf16/fp16 peak, looked up by name, or None (then MFU is not shown)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):    # "L40S", "L40", then "L4"
        if key in name:
            return GPU_PEAK_FLOPS[key]
    return None


def append_log(out, record):
    """One JSON object per line in log.jsonl: easy to read back with a few lines of Python."""
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_step(out, it, total_iters, epoch, loss, lr, norm, stepped, tokens_per_s, seconds_per_step,
             model, device, world):
    """Every log_interval steps: loss, learning rate, tokens/s, MFU (on a known GPU), ETA. Under
    DDP the loss is the mean over the processes: the loss of the whole global batch."""
    # MFU = achieved FLOP/s ÷ the GPU's peak: (6N + 12·L·C·T) FLOPs per token × tokens/s.
    peak = gpu_peak_flops(device)
    mfu = model.flops_per_token() * tokens_per_s / world / peak if peak else None
    print(f"iter {it}/{total_iters} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | "
          f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu * 100:.1f}%" if mfu else "")
          + ("" if stepped else " | fp16 step skipped")
          + f" | ETA {(total_iters - it) * seconds_per_step / 60:.1f} min", flush=True)
    append_log(out, {"type": "train", "iter": it, "epoch": epoch, "loss": loss, "lr": lr,
                     "grad_norm": float(norm), "tokens_per_s": tokens_per_s, "mfu": mfu,
                     "step_skipped": not stepped})


def log_eval(out, it, epoch, losses, meta):
    """The evaluation's line: nats/token, perplexity (e^loss) and bits per byte."""
    # the loss counts the targets: every token, or in chat data the assistant's (val_targets)
    bpb = bits_per_byte(losses["val"], meta.get("val_targets", meta["val_tokens"]),
                        meta["val_bytes"])
    perplexity = math.exp(min(losses["val"], 50))             # e^loss; capped so it cannot overflow
    print(f"eval {it}: train {losses['train']:.4f}, val {losses['val']:.4f} nats/token, "
          f"val perplexity {perplexity:.2f}, val {bpb:.4f} bits/byte", flush=True)
    append_log(out, {"type": "eval", "iter": it, "epoch": epoch, "train_loss": losses["train"],
                     "val_loss": losses["val"], "val_ppl": perplexity, "val_bpb": bpb})


def write_loss_svg(path, train_points, val_points, width=640, height=360, pad=48):
    """A plain SVG line chart of (iteration, loss) points: train in blue, val in orange."""
    # SVG is plain text: a polyline of "x,y" pixel pairs per curve, on axes drawn as lines —
    # no plotting library, and the file opens in any browser.
    points = train_points + val_points
    x_max = max(1, max(p[0] for p in points))
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    y_span = (y_max - y_min) or 1.0

    # SVG's y axis points down: the lowest loss goes to the bottom edge, height − pad.
    def polyline(pts, colour):                                # data → pixel coordinates
        coords = " ".join(f"{pad + it / x_max * (width - 2 * pad):.1f},"
                          f"{height - pad - (loss - y_min) / y_span * (height - 2 * pad):.1f}"
                          for it, loss in pts)
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'

    bottom, right = height - pad, width - pad
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">'
             f'iteration (0 … {x_max})</text>',
             f'<text x="6" y="{pad - 8}">loss {y_max:.3f}</text>',
             f'<text x="6" y="{bottom + 16}">{y_min:.3f}</text>',
             polyline(train_points, "#1f77b4"), polyline(val_points, "#ff7f0e"),
             f'<text x="{right - 110}" y="{pad}" fill="#1f77b4">train loss</text>',
             f'<text x="{right - 110}" y="{pad + 16}" fill="#ff7f0e">val loss</text>',
             "</svg>"]
    with bpe.atomic_path(path) as temp:
        temp.write_text("\n".join(parts) + "\n", encoding="utf-8")


def sample_while_training(model, tokenizer, val_rows, settings, it, out, chat):
    """Print and log a short continuation of --sample_prompt (default: the first line of the
    first validation window, up to 20 characters — text the model has not trained on, in the
    style it learns). On chat data: the model's answer to the first validation question.

    It must not change the training by a single bit: the model goes back to train mode, and the
    sampling draws from a generator of its own (seeded alike each time, so the samples of
    successive evaluations differ only because the model does), never from the global RNG.
    """
    enc = bpe.get_tokenizer(tokenizer)
    prompt, stop = settings.sample_prompt, enc.eot_token
    if chat:                                     # an answer, which ends at <|im_end|>
        stop = enc.encode_single_token(bpe.IM_END)
        if prompt is None:   # the first validation conversation, up to where its answer begins
            row, mask = val_rows.ids[0], val_rows.mask[0]
            ids = row[:int(mask.nonzero()[0])].tolist()
            prompt = enc.decode(ids)
        else:                # your question, asked in the chat template
            ids, _ = bpe.render_chat([{"role": "user", "content": prompt}], enc, reply=True)
    else:
        if prompt is None:
            text = enc.decode([t for t in val_rows.ids[0].tolist() if t != enc.eot_token])
            prompt = next((line.strip() for line in text.splitlines() if line.strip()), "")[:20]
        ids = enc.encode_ordinary(prompt) or [enc.eot_token]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    # temperature 0.8 among the 200 likeliest tokens: a little tamer than the model's raw
    # distribution, so that a sample shows what it has learned more than its noise
    model.eval()
    new_ids = model.stream(torch.tensor([ids[-model.config.block_size:]], device=device),
                           settings.sample_tokens, temperature=0.8, top_k=200, generator=generator)
    new_ids = itertools.takewhile(lambda t: t != stop, map(int, new_ids))
    text = "".join(bpe.decode_stream(enc, new_ids))
    model.train()
    print(f"sample {it}: {prompt}{' → ' if chat else ''}{text}", flush=True)
    append_log(out, {"type": "sample", "iter": it, "prompt": prompt, "text": text})


# ----------------------------------------------------------------------------------------------
# 9. (optional) The run folder, and stopping cleanly
# ----------------------------------------------------------------------------------------------
# What it adds: nothing a user had is lost. A run checks its folder before any work (so a folder
# it cannot write is found now, not after an hour of training), owns it while it runs (a second
# train.py on the same folder would mix two runs' files), never overwrites an earlier run unless
# resuming it, and on resume cuts log.jsonl back to the checkpoint so no iteration is logged twice.

RUN_FILES = ("last.pt", "best_model.pt", "log.jsonl")
LOCK_NAME = "train.lock"


@contextlib.contextmanager
def claim_out_dir(folder, resume):
    """Make `folder` this run's for as long as it runs (only the first process does this).

    Create it and prove it writable; lock it against a second run; refuse to overwrite an earlier
    run's files unless resuming. On the way out the lock is released — and the folder removed, if
    this run created it and failed before writing anything in it.
    """
    if int(os.environ.get("RANK", 0)) != 0:                  # DDP: other processes write nothing
        yield
        return
    created = not folder.exists()
    bpe.make_writable_folder(folder, "--out_dir")
    try:
        with open(folder / LOCK_NAME, "a+") as lock:
            # flock: the OS holds the lock for this process and lets go when it ends, however it
            # ends (even killed with SIGKILL), so a lock is never left behind by a dead run.
            try:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # NB: fail now, not wait
            except BlockingIOError:
                raise InputError(f"{folder} is in use by another training run — wait for it to "
                                 f"end, or use another --out_dir") from None
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")                   # for a person: which process
            lock.flush()
            try:
                earlier = [name for name in RUN_FILES if (folder / name).exists()]
                if earlier and not resume:
                    raise InputError(f"{folder} already holds a run ({', '.join(earlier)}) — add "
                                     f"--resume to continue it, or choose another --out_dir (or "
                                     f"delete them) to start afresh")
                yield
            finally:
                # The file stays, emptied: deleted, it could be locked by a run that opened it a
                # moment before while the next run locks a new file of that name — two at once.
                lock.truncate(0)
    finally:                  # (closed: unlocked) a folder this run made and wrote nothing in goes
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()


def rewind_log(path, iter_num):
    """Keep only log.jsonl's records up to iter_num, where the checkpoint we resume stands: a run
    killed after logging but before saving would otherwise log those iterations twice."""
    if not path.exists():
        return
    # The evaluation at iter_num was logged just before last.pt was saved, so it stays; what
    # came after belongs to the lost stretch, which the resumed run will log again.
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:                       # a line cut short when the process was killed
            continue
        if record.get("iter", 0) <= iter_num:
            kept.append(line if line.endswith("\n") else line + "\n")
    with bpe.atomic_path(path) as temp:
        temp.write_text("".join(kept), encoding="utf-8")


class StopFlag:
    """`with StopFlag() as stop:` — inside, Ctrl-C (SIGINT) or SIGTERM sets stop.requested; the
    loop checks it after each step, so the step in flight finishes and the checkpoint written is
    consistent. A second Ctrl-C stops at once (atomic_path still removes a half-written file)."""

    def __enter__(self):
        self.requested = False
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        """The signal handler: the first signal asks politely, a second insists."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt …",
              flush=True)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# 10. (optional) Several processes: DDP
# ----------------------------------------------------------------------------------------------
# What it adds: `torchrun --nproc_per_node N train.py ...` trains on N GPUs (or N CPU processes)
# with DistributedDataParallel: each process holds the whole model, trains on its own share of
# every batch, and the gradients are averaged (all-reduced) inside backward(), so all copies take
# the same step. The global batch is batch_size × grad_accum × N. On several machines, torchrun
# starts the same command on each (--nnodes, --node_rank, --master_addr); every machine prepares
# its own data, so nothing but the command needs to be shared.

def setup_distributed(device):
    """Under torchrun (RANK set), join the process group: NCCL between GPUs, gloo on CPUs.
    Returns (rank, local rank on this machine, world size, device)."""
    # torchrun tells each process who it is: RANK (0 … WORLD_SIZE−1 over all machines),
    # LOCAL_RANK (its number on this machine, hence its GPU), WORLD_SIZE, and where to meet
    # (MASTER_ADDR, MASTER_PORT), which init_process_group reads.
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "mps":
        raise InputError("DDP needs CUDA GPUs (nccl) or CPUs (gloo); MPS cannot all-reduce — "
                         "use one process")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # A long timeout: the other ranks wait at a barrier while the first downloads and tokenizes.
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(hours=6))
    return rank, local_rank, world, device


def wrap_model(model, compiled, world, device):
    """The model the loop calls: torch.compile'd if asked, in DDP under torchrun."""
    # torch.compile traces the model into fused kernels (minutes of warm-up, then faster steps
    # on a GPU). DDP wraps the outside so that backward() all-reduces the gradients.
    wrapped = torch.compile(model) if compiled else model
    if world > 1:
        wrapped = DDP(wrapped, device_ids=[torch.device(device).index]
                      if device.startswith("cuda") else None)
    return wrapped


def average_across_ranks(values, world, device):
    """{name: float} → the same names, averaged over every process (as they are when alone)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), device=device)
    dist.all_reduce(t)                       # sums over the processes, in place, on every one
    return {name: v / world for name, v in zip(values, t.tolist())}


def leave_distributed():
    """Every process leaves together: one that tears its connections down while another still
    waits on it (rank 0 saving the last checkpoint, say) can leave that one hanging."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code):
    """Exit with `code`; under torchrun, without Python's shutdown (its atexit functions, then
    freeing every object). DDP still holds the process group, so destroy_process_group() does not
    wait for gloo's worker threads, and one may still be freeing the last all-reduce's tensors:
    that needs Python's lock (the GIL). Python stops a thread that asks for it while shutting
    down, and stopping this one in the middle of C++ clean-up makes C++ abort the process
    (SIGABRT), now and then, at the end of a run that went well. Nothing is lost: train()'s `with`
    blocks have written and closed every file, and the OS lets go of the run folder's lock; only
    print()'s buffer needs flushing (a pipe already closed, as by `| head`, is no error)."""
    if "RANK" in os.environ:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# 11. (optional) The command line
# ----------------------------------------------------------------------------------------------
# What it adds: a flag for every field of Settings (section 1 holds its default, its meaning and
# its check; a wrong value is one line, exit 2), and the two ways a run can begin from a
# checkpoint:
#   --resume      continues the run in --out_dir/last.pt. Every setting comes from last.pt; the
#                 flags of RESUME_MAY_CHANGE may be given anew, any other only with the value it
#                 already has (so the command that started the run, plus --resume, works).
#   --init_from   starts a new run, in a folder of its own, from another checkpoint's weights: its
#                 shape and tokenizer come from that checkpoint, so FROM_CHECKPOINT may not be
#                 given; --block_size may shrink the context, never grow it.

RESUME_MAY_CHANGE = ("max_iters", "epochs", "eval_interval", "eval_iters", "log_interval",
                     "sample_every", "sample_prompt", "sample_tokens", "device", "compile",
                     "num_proc")
FROM_CHECKPOINT = ("model_type", "tokenizer", "vocab_size", "block", "n_kv_head", "bias")
RESUME_KEYS = ("model", "model_config", "tokenizer", "optimizer", "scaler", "train_args", "rng",
               "data_state", *PROGRESS_KEYS)


def parse_flags(argv):
    """The flags on the command line, as {setting: value} — only those given (no defaults: those
    are Settings', or the checkpoint's) — and the two ways to begin: (given, resume, init_from)."""
    p = bpe.ArgumentParser(prog="train.py", argument_default=argparse.SUPPRESS,
                           description="Train a GPT from scratch (see the lesson's docstring).")
    for field in dataclasses.fields(Settings):
        flag = dict(field.metadata)
        names = [f"--{field.name}", *flag.pop("aliases", [])]
        default = field.default
        if field.name in PRESET_DEFAULTS["gpt-micro"]:           # None: the model size's
            default = f"per --model_type; gpt-micro's is {PRESET_DEFAULTS['gpt-micro'][field.name]}"
        flag["help"] += f" (default: {default})"
        if field.type is bool:
            p.add_argument(*names, action="store_true", **flag)
        else:
            p.add_argument(*names, **{"type": field.type, **flag})
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir/last.pt")
    p.add_argument("--init_from", help="start a new run from this checkpoint's weights, shape and "
                                       "tokenizer")
    given = vars(p.parse_args(argv))
    resume, init_from = given.pop("resume", False), given.pop("init_from", None)
    if resume and init_from:
        p.error("--resume continues out_dir's own run; --init_from starts a new one from another "
                "checkpoint — use one of them")
    if init_from and "out_dir" not in given:
        p.error("--init_from starts a new run: give it a folder of its own with --out_dir")
    return given, resume, init_from


def resumed_settings(given, ckpt, path):
    """--resume: last.pt's settings, with the flags of RESUME_MAY_CHANGE given anew."""
    saved = ckpt["train_args"]
    changed = sorted(k for k, v in given.items()
                     if k not in RESUME_MAY_CHANGE + ("out_dir",) and saved.get(k) != v)
    if changed:
        raise InputError(f"--resume goes on with the settings in {path}; --{changed[0]} cannot "
                         f"change (it was {saved.get(changed[0])}) — leave it out, or start a new "
                         f"run; only {', '.join('--' + k for k in RESUME_MAY_CHANGE)} "
                         f"can be given anew")
    settings = Settings(**{**saved, **given})
    if "epochs" in given and "max_iters" not in given:
        settings.max_iters = None                # a length in epochs replaces the one in steps
    return settings


def started_settings(given, ckpt, path):
    """--init_from: a new run's settings; the shape and the tokenizer are the checkpoint's."""
    held = [k for k in FROM_CHECKPOINT if k in given]
    if held:
        raise InputError(f"--init_from takes --{held[0]} from {path} "
                         f"(with {', '.join(FROM_CHECKPOINT)}) — leave it out")
    context = ckpt["model_config"]["block_size"]
    if given.get("block_size", context) > context:
        raise InputError(f"--block_size {given['block_size']} is longer than the context of {path} "
                         f"({context}): it can shrink, never grow")
    taken = {k: ckpt["train_args"][k] for k in FROM_CHECKPOINT}
    return new_settings(**{"block_size": context, **given, **taken})


def main(argv=None):
    """python train.py [flags]: parse, read the checkpoint a run begins from, train. Errors become
    one line (bpe.run_command)."""
    given, resume, init_from = parse_flags(sys.argv[1:] if argv is None else list(argv))
    if resume:
        path = pathlib.Path(given.get("out_dir") or new_settings(**given).out_dir) / "last.pt"
        if not path.exists():
            raise InputError(f"--resume, but there is no {path} — start without --resume, or give "
                             f"the --out_dir of the run to continue")
        ckpt = bpe.read_checkpoint(path, need=RESUME_KEYS)
        train(resumed_settings(given, ckpt, path), resume={**ckpt, "path": path})
    elif init_from:
        ckpt = bpe.read_checkpoint(init_from, need=("model", "model_config", "tokenizer",
                                                     "train_args", "iter_num"))
        train(started_settings(given, ckpt, init_from), start={**ckpt, "path": init_from})
    else:
        train(new_settings(**given))


if __name__ == "__main__":
    end_process(bpe.run_command(main))
