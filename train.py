"""Lesson 5 — training: the whole loop in plain code.

What you will learn here, numbered as the section banners:
  1. the settings of a run, each with its default, and the defaults each model size trains with;
  2. device and precision: CUDA / MPS / CPU, bfloat16 or float16 autocast, and why float16 needs
     a GradScaler while bfloat16 does not;
  3. the optimizers — AdamW (weight decay only on matrices), and Muon, which orthogonalises each
     hidden matrix's update — and the learning-rate schedule (linear warm-up, then cosine decay);
  4. one optimisation step: gradient accumulation over micro-batches, unscaling, clipping;
  5. evaluation in nats/token, perplexity and bits per byte (comparable across tokenizers);
  6. the checkpoint: one function builds it and says who reads each key; putting it back so a
     resumed run goes on exactly as if it had never stopped;
  7. the run: setting it up (fresh, resumed, or started from another model's weights), the loop
     itself — a visible `while`, no trainer class — and evaluating and saving.
Optional sections, for a second reading:
  8. (optional) progress: log lines with tokens/s and MFU, log.jsonl, loss.svg, and a sample of
     the model's writing while it trains (--sample_every);
  9. (optional) the run folder: one run at a time (a lock), checked before any work, a log that
     rewinds on resume, and clean stops on Ctrl-C / SIGTERM;
 10. (optional) several processes: DDP under torchrun, on one machine or several;
 11. (optional) the command line: a flag for every setting, and what --resume and --init_from
     take from a checkpoint.

You need: gpt.py (the model), bpe.py (tokenizers, decode_stream), data.py (prepare, token files
and batches).
Next lesson: sample.py turns the checkpoint this file writes back into text.

    python train.py --model_type gpt-micro --dataset chinese --max_iters 2000
    python train.py --resume --out_dir checkpoints/gpt-micro --max_iters 4000
    python train.py --init_from checkpoints/gpt-micro/best_model.pt --dataset my.txt --out_dir mine
    torchrun --nproc_per_node 2 train.py --model_type gpt-mini --dataset chinese
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import random
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import data
from bpe import InputError
from gpt import GPT, PRESETS, GPTConfig, strip_wrapper_prefixes


# ----------------------------------------------------------------------------------------------
# 1. Settings and defaults
# ----------------------------------------------------------------------------------------------
# Every setting of a run, with its default; the command line has a flag for each (`--name value`),
# and a checkpoint stores them all, so that --resume goes on with exactly these. A default of None
# means "the model size's own" (PRESET_DEFAULTS below) or is explained beside it.

@dataclasses.dataclass
class Settings:
    # what to train, on what
    model_type: str = "gpt-micro"           # a size from gpt.PRESETS
    dataset: str = "chinese"                # built-in name, a path, or NAME for data/raw/NAME/
    # "bpe" (ours, trained on the dataset, vocab_size ids), gpt2, cl100k_base, or a saved BPE's path
    tokenizer: str = data.DEFAULT_TOKENIZER
    vocab_size: int = data.DEFAULT_VOCAB_SIZE
    data_dir: str = "data"                  # raw downloads and token files
    max_mb: float = None                    # use only this many MB of the text (None: all of it)
    num_proc: int = None                    # tokenizing threads (None: every core)
    # the model
    block: str = None                       # "gpt2" (GPT-2's block) or "llama" (Llama's)
    n_kv_head: int = None                   # the llama block's key/value heads (None: one per head)
    block_size: int = None                  # context in tokens
    dropout: float = 0.0  # 0 for pre-training on plenty of data; 0.1–0.2 on little
    bias: bool = True                       # biases in Linear layers and LayerNorms (GPT-2's block)
    # how long, in what batches, at what learning rate
    max_iters: int = None                   # optimizer steps; None with epochs: epochs decide
    epochs: float = None                    # passes over the training tokens
    batch_size: int = None                  # sequences per micro-batch, per process
    grad_accum: int = 1                     # micro-batches per optimizer step
    optimizer: str = None                   # "adamw", or "muon" for the blocks' matrices (+ AdamW)
    lr: float = None                        # peak learning rate (AdamW's)
    muon_lr: float = 0.02                   # Muon's peak learning rate
    min_lr: float = None                    # the end of the cosine (None: lr / 10)
    warmup_iters: int = None                # steps of linear warm-up
    lr_decay_iters: int = None              # the cosine's length (None: the whole run)
    weight_decay: float = 0.1               # AdamW's, on matrices only
    beta2: float = None                     # AdamW's β2
    grad_clip: float = 1.0                  # clip the gradient norm to this (0: never)
    # where, and how fast
    dtype: str = "auto"                     # auto, float32, bfloat16, float16
    device: str = "auto"                    # auto, cpu, cuda, cuda:N, mps
    compile: bool = False                   # torch.compile the model (faster on a GPU)
    # watching it learn
    eval_interval: int = 250                # evaluate and save every N steps
    eval_iters: int = 20                    # batches per evaluation
    log_interval: int = 10                  # a progress line every N steps
    sample_every: int = 0                   # print a sample at every N-th evaluation (0: never)
    sample_prompt: str = None               # (None: the validation text's first line)
    sample_tokens: int = 60
    # where it goes
    out_dir: str = None                     # the run folder (None: checkpoints/<model_type>)
    seed: int = 1337                        # weights, data order, dropout


# What each size trains well with. nano/micro/mini are sized for a CPU (a few thousand steps in
# minutes to an hour); gpt-small and the GPT-2 sizes want a GPU (for GPT-2's ~0.5M tokens a step,
# add --grad_accum 40 as nanoGPT does). The small sizes take the llama block and Muon: in equal
# CPU time they reach 0.14–0.28 bits/byte less than GPT-2's block with AdamW (README, "Measured
# results"); the gpt2* sizes keep GPT-2's block and AdamW, comparable with GPT-2 and nanoGPT.
# β2 = 0.99 averages the squared gradients over ~100 steps, steadier for the small, noisy batches
# of a CPU run; big batches take nanoGPT's 0.95.
PRESET_DEFAULTS = {
    "gpt-nano":    dict(block_size=64,   batch_size=32, lr=2e-3,
                        max_iters=2000,   warmup_iters=100,  beta2=0.99,
                        block="llama", optimizer="muon"),
    "gpt-micro":   dict(block_size=128,  batch_size=32, lr=1e-3,
                        max_iters=5000,   warmup_iters=100,  beta2=0.99,
                        block="llama", optimizer="muon"),
    "gpt-mini":    dict(block_size=256,  batch_size=32, lr=1e-3,
                        max_iters=5000,   warmup_iters=200,  beta2=0.99,
                        block="llama", optimizer="muon"),
    "gpt-small":   dict(block_size=512,  batch_size=16, lr=6e-4,
                        max_iters=20000,  warmup_iters=500,  beta2=0.99,
                        block="llama", optimizer="muon"),
    "gpt2":        dict(block_size=1024, batch_size=12, lr=6e-4,
                        max_iters=600000, warmup_iters=2000, beta2=0.95,
                        block="gpt2", optimizer="adamw"),
    "gpt2-medium": dict(block_size=1024, batch_size=12, lr=3e-4,
                        max_iters=600000, warmup_iters=2000, beta2=0.95,
                        block="gpt2", optimizer="adamw"),
    "gpt2-large":  dict(block_size=1024, batch_size=8,  lr=2.5e-4,
                        max_iters=600000, warmup_iters=2000, beta2=0.95,
                        block="gpt2", optimizer="adamw"),
    "gpt2-xl":     dict(block_size=1024, batch_size=4,  lr=2e-4,
                        max_iters=600000, warmup_iters=2000, beta2=0.95,
                        block="gpt2", optimizer="adamw"),
}


def new_settings(**given):
    """A new run's settings: those given, else the model size's, else Settings' own defaults."""
    preset = dict(PRESET_DEFAULTS[given.get("model_type", Settings.model_type)])
    if "epochs" in given:
        del preset["max_iters"]                  # --epochs sets the length instead
    settings = Settings(**{**preset, **given})
    settings.out_dir = settings.out_dir or os.path.join("checkpoints", settings.model_type)
    return settings


# ----------------------------------------------------------------------------------------------
# 2. Device and precision
# ----------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """'auto' → an NVIDIA GPU (cuda), then Apple's (mps), then the CPU; other names as they are
    (the command line's device_flag checked them). sample.py uses this too."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(name, device):
    """float32 on a CPU unless asked; on a GPU bfloat16 if supported, else float16.

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

def orthogonalise(G, steps=5):
    """≈ U·Vᵀ for G = U·S·Vᵀ (2-D), by Newton–Schulz iterations, in bfloat16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
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


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then each update orthogonalised; for 2-D weights only."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                m.lerp_(p.grad, 1 - mu)                  # m ← μ·m + (1 − μ)·g: recent gradients
                # Nesterov: (1 − μ)·g + μ·m, a step ahead
                update = orthogonalise(p.grad.lerp(m, mu))
                p.mul_(1 - lr * group["weight_decay"])   # decoupled weight decay, as AdamW's
                # U·Vᵀ of a (rows, cols) matrix has entries of size ~1/√max(rows, cols); a tall
                # matrix gets √(rows/cols) more, so that every matrix moves alike per step.
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
    # fused=True: one kernel updates every tensor instead of a loop of small ops per tensor.
    # It exists on CUDA, and on CPU from torch 2.4; elsewhere we fall back to the loop.
    try:
        adamw = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, settings.beta2), fused=True)
    except (RuntimeError, TypeError):                          # older torch, or MPS
        adamw = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, settings.beta2))
    if settings.optimizer != "muon":
        return [adamw]
    matrices = [p for name, p in named if hidden(name, p)]
    return [Muon(matrices, lr=settings.muon_lr, weight_decay=settings.weight_decay), adamw]


def learning_rate(it, settings, total_iters):
    """Linear warm-up from 0 to lr over warmup_iters, then cosine decay to min_lr.

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
def estimate_loss(model, tokens_by_split, settings, device, autocast_ctx, seed):
    """Mean loss over eval_iters random batches of each split, in nats/token.

    The batches come from a generator with a fixed seed, never from the global RNG: every
    evaluation then measures the same batches (so "best" means better, not luckier), and it
    cannot shift the random numbers the training draws (dropout) — which is what keeps a resumed
    run identical to an uninterrupted one.
    """
    model.eval()
    out = {}
    for split, tokens in tokens_by_split.items():
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(settings.eval_iters)
        for i in range(settings.eval_iters):
            x, y = data.get_batch(tokens, settings.block_size, settings.batch_size, g, device)
            with autocast_ctx:
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def bits_per_byte(nats_per_token, tokens, n_bytes):
    """nats/token → bits/byte: × tokens (the text's total nats), ÷ ln 2 (nats → bits), ÷ the
    text's UTF-8 bytes. A property of the text, not of the tokens: models with different
    tokenizers compare fairly by it. sample.py scores texts with it too."""
    return nats_per_token * tokens / math.log(2) / n_bytes


# ----------------------------------------------------------------------------------------------
# 6. The checkpoint
# ----------------------------------------------------------------------------------------------
# A checkpoint is one dict that torch.load(path, weights_only=True) can read: tensors and plain
# Python (dict, list, str, int, float) only. A full pickle can run any code while loading, so a
# checkpoint downloaded from a stranger could take over the machine; weights_only refuses that,
# which is why nothing in ours is a class. make_checkpoint lists every key and who reads it.

MODEL_CONFIG_FLAGS = ("block", "n_kv_head", "block_size", "dropout", "bias")  # kept in model_config


def make_checkpoint(run):
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
    train_args     every setting but MODEL_CONFIG_FLAGS (one copy)    --resume, sample.py's check
    rng            the state of every random generator a step draws   --resume
    data_state     where the batch iterator stands (BatchIterator)    --resume
    history        (iteration, loss) of every evaluation: loss.svg    --resume
    init_from      {"path", "iter_num"} of the checkpoint this run    a record for you
                   started from (--init_from), or None
    """
    settings = dataclasses.asdict(run.settings)
    return {
        "model": run.model.state_dict(),
        "model_config": run.model.config.to_dict(),
        "tokenizer": run.tokenizer_entry,
        "optimizer": [optimizer.state_dict() for optimizer in run.optimizers],
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss,
        "train_args": {k: v for k, v in settings.items() if k not in MODEL_CONFIG_FLAGS},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                # the current GPU's. Only rank 0 saves, and every rank restores its state: all
                # ranks were seeded alike and draw alike, so their generators were equal anyway.
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        "data_state": run.batches.state_dict(),
        "history": run.history,
        "init_from": run.init_from,
    }


def save_checkpoint(checkpoint, path):
    """torch.save under a temporary name, then a rename (bpe.atomic_path): the file at `path` is
    the old checkpoint until the new one is whole. A failed save (disk full, no permission) is
    one line, with the old file untouched and the temporary one removed."""
    try:
        with bpe.atomic_path(path) as temp:
            torch.save(checkpoint, temp)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:100]
        raise InputError(f"could not save {path} ({reason}) — is {pathlib.Path(path).parent} "
                         f"full or read-only? The checkpoint already there is untouched") from None


def build_model(ckpt, path, **changes):
    """GPT(GPTConfig(**model_config)) with the saved weights. `changes` replace config fields:
    --init_from sets the dropout, and may shrink block_size (the first position rows are kept)."""
    config = GPTConfig(**{**ckpt["model_config"], **changes})
    weights = strip_wrapper_prefixes(ckpt["model"])
    if "wpe.weight" in weights:
        weights["wpe.weight"] = weights["wpe.weight"][:config.block_size]
    try:
        model = GPT(config)
        model.load_state_dict(weights)
    except (AssertionError, TypeError, ValueError, RuntimeError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path}: the weights do not fit its model_config "
                         f"({first_line})") from None
    return model


def restore(run, ckpt):
    """--resume: put back everything make_checkpoint saved, so the run continues exactly."""
    run.model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    # (a checkpoint from before Muon holds one optimizer state, not a list)
    states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
    for optimizer, state in zip(run.optimizers, states):
        optimizer.load_state_dict(state)
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    run.history, run.init_from = ckpt["history"], ckpt["init_from"]
    run.batches.load_state_dict(ckpt["data_state"])
    # Last, every generator: the next batch, the next dropout mask, are then exactly those the
    # uninterrupted run would have drawn.
    random.setstate(ckpt["rng"]["python"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


# ----------------------------------------------------------------------------------------------
# 7. The run
# ----------------------------------------------------------------------------------------------
# The loop calls into the optional sections: progress lines and samples (section 8), the run
# folder and clean stops (section 9), and several processes (section 10). Each name says what it
# does, so a first reading can take them on trust.

@dataclasses.dataclass
class Run:
    """What one training run carries from step to step: what a checkpoint saves, and the rest."""
    settings: Settings
    device: str
    dtype: str
    rank: int                                # this process's number (0 when alone), and the
    world: int                               # number of processes
    meta: dict                               # data.py's meta.json: token and byte counts
    tokens: dict                             # {"train": tensor, "val": tensor}, mapped from disk
    batches: data.BatchIterator
    model: GPT                               # the bare model: what we save and sample from
    optimizers: list                         # [AdamW], or [Muon, AdamW]
    scaler: torch.amp.GradScaler
    tokenizer_entry: dict
    total_iters: int
    iter_num: int = 0
    best_val_loss: float = float("inf")
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "val": []})
    init_from: dict = None
    timed_since: tuple = (0.0, 0)            # (time, iteration) tokens/s is measured from

    @property
    def master(self):
        """Only the first process prints and writes files: the others would write the same."""
        return self.rank == 0

    @property
    def out(self):
        """The run folder (--out_dir): last.pt, best_model.pt, log.jsonl, loss.svg."""
        return pathlib.Path(self.settings.out_dir)


def tokenizer_for(settings, resume, start):
    """The tokenizer to prepare the data with: --tokenizer for a new run; the checkpoint's own for
    a run started from one, or resumed — except that a resumed run which trained its own BPE asks
    for "bpe" again, and so finds the data folder, and the BPE in it, that it wrote."""
    if start is not None:
        return bpe.tokenizer_from_entry(start["tokenizer"])
    if resume is not None and not (settings.tokenizer == "bpe" and resume["init_from"] is None):
        return bpe.tokenizer_from_entry(resume["tokenizer"])
    return settings.tokenizer


def start_run(settings, resume, start):
    """Everything before the first step: the device, the data, the model and the optimizer —
    fresh, or continuing `resume` (out_dir/last.pt), or starting from `start` (--init_from)."""
    device = pick_device(settings.device)
    rank, local_rank, world, device = setup_distributed(device)
    dtype = pick_dtype(settings.dtype, device)
    if device.startswith("cuda"):
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, ~8× faster, and precise
        # enough for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The weights' initialisation and dropout draw from torch's global generator: seeding it makes
    # a run repeatable, and the checkpoint's "rng" carries it on across a resume.
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    # The data, then the model: the model's vocabulary is the size of the tokenizer the data was
    # written with (data.py's meta.json says it).
    folder = prepare_data(settings, tokenizer_for(settings, resume, start), local_rank)
    tokenizer = data.load_tokenizer(folder)
    if resume is not None and bpe.tokenizer_from_entry(resume["tokenizer"]) != tokenizer:
        raise InputError(f"{folder} now holds another tokenizer than {settings.out_dir}/last.pt: "
                         f"the text changed since — resume with the text as it was, "
                         f"or start a new run")
    meta = data.load_meta(folder)
    tokens = {split: data.load_tokens(folder, split) for split in ("train", "val")}
    batches = data.BatchIterator(tokens["train"], settings.block_size, settings.batch_size,
                                 seed=settings.seed, rank=rank, world_size=world, device=device)
    if start is not None:
        model = build_model(start, start["path"], block_size=settings.block_size,
                            dropout=settings.dropout)
    else:
        model = GPT(GPTConfig.from_preset(settings.model_type, vocab_size=meta["vocab_size"],
                                          block_size=settings.block_size, dropout=settings.dropout,
                                          bias=bool(settings.bias), block=settings.block,
                                          n_kv_head=settings.n_kv_head))
    model.to(device)
    optimizers = make_optimizers(model, settings)
    # The scaler is only active for float16; for other dtypes every call passes straight through.
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=(dtype == "float16"))
    run = Run(settings, device, dtype, rank, world, meta, tokens, batches, model, optimizers,
              scaler, bpe.tokenizer_entry(tokenizer), total_iters=count_iters(settings, batches),
              init_from=({"path": str(start["path"]), "iter_num": start["iter_num"]}
                         if start else None))
    if resume is not None:
        restore(run, resume)
        if run.master:
            rewind_log(run.out / "log.jsonl", run.iter_num)
            print(f"resumed from {run.out / 'last.pt'} at iteration {run.iter_num}")
    elif run.master:
        (run.out / "log.jsonl").unlink(missing_ok=True)
    return run


def count_iters(settings, batches):
    """The run's length in optimizer steps: --max_iters, else --epochs passes over the data."""
    if settings.max_iters is not None:
        return settings.max_iters
    steps_per_epoch = max(1, batches.steps_per_epoch // settings.grad_accum)
    return max(1, round(settings.epochs * steps_per_epoch))


def train(settings, resume=None, start=None):
    """A whole training run; returns {"iter_num", "best_val_loss", "history"}.

    resume: the checkpoint of the run to continue (out_dir/last.pt); start: a checkpoint whose
    weights, shape and tokenizer a new run begins from (--init_from), its "path" added.
    """
    with claim_out_dir(settings.out_dir, resume is not None):  # the folder is ours: checked, locked
        run = start_run(settings, resume, start)
        wrapped = wrap_model(run)                # run.model inside torch.compile and/or DDP
        autocast_ctx = autocast_context(run.device, run.dtype)
        print_start(run)
        # The loop: at each iteration first evaluate (every eval_interval steps), then stop or
        # take one step. Evaluating first means iteration 0 measures the model as it starts, and
        # the last evaluation sees the final weights.
        stopping = False
        with StopFlag() as stop:                 # Ctrl-C / SIGTERM: finish the step, then save
            while True:
                if run.iter_num % settings.eval_interval == 0 or run.iter_num == run.total_iters:
                    evaluate_and_save(run, wrapped, autocast_ctx)
                if run.iter_num >= run.total_iters or stopping:
                    break
                # one optimisation step
                lr = learning_rate(run.iter_num, settings, run.total_iters)
                for optimizer in run.optimizers:                  # each reads its rate here:
                    for group in optimizer.param_groups:          # AdamW's lr, Muon's in proportion
                        group["lr"] = lr * (settings.muon_lr / settings.lr
                                            if isinstance(optimizer, Muon) else 1)
                loss = forward_backward(wrapped, run.batches.next_batch, settings.grad_accum,
                                        autocast_ctx, run.scaler, ddp=run.world > 1)
                norm, stepped = optimizer_step(wrapped, run.optimizers, run.scaler,
                                               settings.grad_clip)
                loss = loss.item()               # waits for the GPU: once per step
                stopping = stop.requested
                if run.world > 1:                # every rank must agree to stop
                    stopping, loss = agree_across_ranks(run, stopping, loss)
                check_finite(run, loss)
                run.iter_num += 1
                if run.iter_num % settings.log_interval == 0:
                    log_progress(run, loss, lr, norm, stepped)
        finish(run, stopping)
        leave_distributed()
    return {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "history": run.history}


def evaluate_and_save(run, model, autocast_ctx):
    """Estimate both losses, print and log them, save last.pt — and best_model.pt when the val
    loss is the lowest yet — redraw loss.svg, and write a sample if --sample_every asks."""
    if run.history["val"] and run.history["val"][-1][0] == run.iter_num:
        return                                   # just resumed here: this evaluation is done
    losses = estimate_loss(model, run.tokens, run.settings, run.device, autocast_ctx,
                           seed=run.settings.seed + 1000 * run.rank)
    if run.world > 1:
        losses = average_across_ranks(run, losses)
    check_finite(run, losses["train"] + losses["val"], evaluating=True)
    run.history["train"].append((run.iter_num, losses["train"]))
    run.history["val"].append((run.iter_num, losses["val"]))
    if not run.master:
        return
    log_eval(run, losses)
    # last.pt is always the newest state (to resume from); best_model.pt the one with the lowest
    # val loss (to sample from): with a small dataset the model can get worse as it memorises.
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    checkpoint = make_checkpoint(run)
    save_checkpoint(checkpoint, run.out / "last.pt")
    if improved:
        save_checkpoint(checkpoint, run.out / "best_model.pt")
    write_loss_svg(run.out / "loss.svg", run.history["train"], run.history["val"])
    if run.settings.sample_every and (len(run.history["val"]) - 1) % run.settings.sample_every == 0:
        sample_while_training(run)
    run.timed_since = (time.time(), run.iter_num)            # tokens/s counts training time only


def check_finite(run, loss, evaluating=False):
    """A NaN or infinite loss means training diverged: stop at once, saving nothing more. With
    float16 a non-finite training loss can be a passing overflow that the scaler handles by
    skipping the step; there the next evaluation gives the verdict."""
    if math.isfinite(loss) or (run.dtype == "float16" and not evaluating):
        return
    saved = run.history["val"][-1][0] if run.history["val"] else 0
    raise InputError(f"loss is {loss} at iteration {run.iter_num} — training diverged. Nothing was "
                     f"saved after iteration {saved}; try a lower --lr (now {run.settings.lr}) or "
                     f"--dtype float32/bfloat16")


def finish(run, stopped):
    """The last words: how to resume a stopped run, or where the checkpoints are."""
    if not run.master:
        return
    last, best = run.out / "last.pt", run.out / "best_model.pt"
    if stopped and run.iter_num < run.total_iters:
        save_checkpoint(make_checkpoint(run), last)
        launcher = f"torchrun --nproc_per_node {run.world}" if run.world > 1 else "python"
        print(f"stopped at iteration {run.iter_num}; saved {last}. Resume with:\n"
              f"  {launcher} train.py --resume --out_dir {run.out}")
    else:
        print(f"done: {run.iter_num} iterations, best val loss {run.best_val_loss:.4f}; "
              f"checkpoints in {run.out} — sample with: python sample.py --checkpoint {best}")


# ----------------------------------------------------------------------------------------------
# 8. (optional) Progress: log lines, log.jsonl, loss.svg, samples while training
# ----------------------------------------------------------------------------------------------
# What it adds: what a person watches during a run. Nothing here changes the training: it reads
# the run and writes text (and sampling uses a random generator of its own).

# MFU, model FLOPs utilisation: the FLOP/s the model's arithmetic needs at the measured tokens/s,
# as a share of what the GPU could do. 30–50 % is good for a GPT of this size. The peaks: dense
# bf16/fp16 tensor-core FLOP/s from the vendors' data sheets (no sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                  "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def gpu_peak_flops(device):
    """The GPU's bf16/fp16 peak, looked up by name, or None (then MFU is not shown)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):    # "L40S" before "L4"
        if key in name:
            return GPU_PEAK_FLOPS[key]
    return None


def tokens_per_step(run):
    """Tokens one optimizer step trains on, over every process."""
    s = run.settings
    return s.batch_size * s.block_size * s.grad_accum * run.world


def print_start(run):
    """The run in one line: model size, vocabulary, context, device, precision, length."""
    run.timed_since = (time.time(), run.iter_num)
    if run.master:
        steps = max(1, run.batches.steps_per_epoch // run.settings.grad_accum)
        config = run.model.config
        print(f"model {run.settings.model_type}: "
              f"{run.model.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
              f"vocab {config.vocab_size}, context {config.block_size} | device {run.device}, "
              f"{run.dtype} | {tokens_per_step(run):,} tokens/step, {steps} steps/epoch, "
              f"{run.total_iters} steps")


def append_log(run, record):
    """One JSON object per line in log.jsonl: easy to read back with a few lines of Python."""
    with open(run.out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_progress(run, loss, lr, norm, stepped):
    """Every log_interval steps: loss, learning rate, tokens/s, MFU (on a known GPU), ETA.

    Under DDP the printed loss is the mean over the processes, each of which saw its own share
    of the batch: the loss of the whole global batch.
    """
    if run.world > 1:
        loss = average_across_ranks(run, {"loss": loss})["loss"]
    if not run.master:
        return
    # tokens/s counts training only: the clock restarts after each evaluation (evaluate_and_save)
    now, (since, since_iter) = time.time(), run.timed_since
    dt = (now - since) / max(1, run.iter_num - since_iter)            # seconds per step
    run.timed_since = (now, run.iter_num)
    tokens_per_s = tokens_per_step(run) / dt
    # MFU = achieved FLOP/s ÷ the GPU's peak: (6N + 12·L·C·T) FLOPs per token × tokens/s.
    peak = gpu_peak_flops(run.device)
    mfu = run.model.flops_per_token() * tokens_per_s / run.world / peak if peak else None
    eta_minutes = (run.total_iters - run.iter_num) * dt / 60
    print(f"iter {run.iter_num}/{run.total_iters} | epoch {run.batches.epoch} | loss {loss:.4f} | "
          f"lr {lr:.2e} | {tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu * 100:.1f}%" if mfu else "") +
          ("" if stepped else " | fp16 step skipped") + f" | ETA {eta_minutes:.1f} min", flush=True)
    append_log(run, {"type": "train", "iter": run.iter_num, "epoch": run.batches.epoch,
                     "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens_per_s": tokens_per_s,
                     "mfu": mfu, "step_skipped": not stepped})


def log_eval(run, losses):
    """The evaluation's line: nats/token, perplexity (e^loss) and bits per byte."""
    bpb = bits_per_byte(losses["val"], run.meta["val_tokens"], run.meta["val_bytes"])
    perplexity = math.exp(min(losses["val"], 50))             # e^loss; capped so it cannot overflow
    print(f"eval {run.iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f} nats/token, "
          f"val perplexity {perplexity:.2f}, val {bpb:.4f} bits/byte", flush=True)
    append_log(run, {"type": "eval", "iter": run.iter_num, "epoch": run.batches.epoch,
                     "train_loss": losses["train"], "val_loss": losses["val"],
                     "val_ppl": perplexity, "val_bpb": bpb})


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


def default_sample_prompt(run, enc):
    """The first line of the validation text, cut to 20 characters: text the model has not
    trained on, in the style it learns."""
    first_ids = run.tokens["val"][:200].tolist()             # 200 tokens hold a line or more
    text = "".join(bpe.decode_stream(enc, [t for t in first_ids if t != enc.eot_token]))
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:20]


def sample_while_training(run):
    """Print and log a short continuation of --sample_prompt, to see the model learn.

    It must not change the training by a single bit: the model goes back to train mode, and the
    sampling draws from a generator of its own (seeded alike each time, so the samples of
    successive evaluations differ only because the model does), never from the global RNG.
    """
    enc = bpe.get_tokenizer(run.tokenizer_entry)
    s = run.settings
    prompt = s.sample_prompt if s.sample_prompt is not None else default_sample_prompt(run, enc)
    ids = enc.encode_ordinary(prompt)[-run.model.config.block_size:] or [enc.eot_token]
    generator = torch.Generator(device=run.device).manual_seed(s.seed)
    # temperature 0.8 among the 200 likeliest tokens: a little tamer than the model's raw
    # distribution, so that a sample shows what it has learned more than its noise
    run.model.eval()
    new_ids = run.model.stream(torch.tensor([ids], device=run.device), s.sample_tokens,
                               temperature=0.8, top_k=200, generator=generator)
    text = "".join(bpe.decode_stream(enc, (t for t in map(int, new_ids) if t != enc.eot_token)))
    run.model.train()
    print(f"sample {run.iter_num}: {prompt}{text}", flush=True)
    append_log(run, {"type": "sample", "iter": run.iter_num, "prompt": prompt, "text": text})


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
def claim_out_dir(out_dir, resume):
    """Make out_dir this run's for as long as it runs (only the first process does this).

    Create it and prove it writable; lock it against a second run; refuse to overwrite an
    earlier run's files unless resuming. On the way out the lock goes — and the folder too, if
    this run created it and failed before writing anything in it.
    """
    if int(os.environ.get("RANK", 0)) != 0:                  # DDP: other processes write nothing
        yield
        return
    folder = pathlib.Path(out_dir)
    created = not folder.exists()
    bpe.make_writable_folder(folder, "--out_dir")
    lock = folder / LOCK_NAME
    take_lock(lock)  # first the lock: a run going on now is the likelier story
    try:
        earlier = [name for name in RUN_FILES if (folder / name).exists()]
        if earlier and not resume:
            raise InputError(f"{out_dir} already holds a run ({', '.join(earlier)}) — "
                             f"add --resume to continue it, or choose another --out_dir "
                             f"(or delete them) to start afresh")
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()


def take_lock(path):
    """Create the lock file exclusively (O_EXCL: of two processes trying at once, exactly one
    succeeds), holding "host pid". A lock whose process has ended (killed with SIGKILL, the machine
    rebooted) is taken over, with a note."""
    while True:                              # again only after a lock went away or was stale
        try:
            with open(path, "x") as f:       # "x": create, or fail if it exists
                f.write(f"{socket.gethostname()} {os.getpid()}")
            return
        except FileExistsError:
            pass
        try:
            host, pid = (path.read_text(errors="replace").split() + ["?", "?"])[:2]
        except FileNotFoundError:
            continue                             # it went away meanwhile: try again
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            print(f"note: {path} was left by a process that has ended; taking it over",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        raise InputError(f"{path.parent} is in use by another training run "
                         f"(process {pid} on {host}) — wait for it to end or use another "
                         f"--out_dir (if no run is going, delete {path})")


def process_alive(pid):
    """Whether a process with this id runs on this machine (signal 0 only asks "do you exist?")."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # it exists, under another user
        pass
    return True


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


def prepare_data(settings, tokenizer, local_rank):
    """Tokenize once per machine: each machine's first process prepares, the others wait, then
    find it done. (One machine's disk is not another's: a rank-0-only rule would leave a second
    machine's processes without data, or all of them tokenizing at once.)"""
    kwargs = dict(data_dir=settings.data_dir, max_mb=settings.max_mb, num_proc=settings.num_proc,
                  vocab_size=settings.vocab_size)
    # Prepared data is reused, so the waiting processes' own prepare() only finds it done.
    if local_rank == 0:
        folder = data.prepare(settings.dataset, tokenizer, verbose=True, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    if local_rank != 0:
        folder = data.prepare(settings.dataset, tokenizer, verbose=False, **kwargs)
    return folder


def wrap_model(run):
    """The model the loop calls: torch.compile'd if asked, in DDP under torchrun. The bare model
    stays in run.model: it is what we save, and what samples."""
    # torch.compile traces the model into fused kernels (minutes of warm-up, then faster steps
    # on a GPU). DDP wraps the outside so that backward() all-reduces the gradients.
    model = torch.compile(run.model) if run.settings.compile else run.model
    if run.world > 1:
        device_ids = [torch.device(run.device).index] if run.device.startswith("cuda") else None
        model = DDP(model, device_ids=device_ids)
    return model


def average_across_ranks(run, values):
    """{name: float} → the same names, averaged over every process."""
    t = torch.tensor(list(values.values()), device=run.device)
    dist.all_reduce(t)                       # sums over the processes, in place, on every one
    return {name: v / run.world for name, v in zip(values, t.tolist())}


def agree_across_ranks(run, stop_requested, loss):
    """Every rank must leave the loop at the same step, or the others would wait forever in the
    next all-reduce: agree on "stop?" and "diverged?" together (any rank's yes is everyone's).
    A signal reaches the processes at different moments (or only one of them), and a NaN can
    appear on one rank's data alone; a MAX all-reduce of two flags settles both at once."""
    flags = torch.tensor([float(stop_requested), float(not math.isfinite(loss))], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), float("nan") if flags[1] else loss


def leave_distributed():
    """Every process leaves together: one that tears its connections down while another still
    waits on it (rank 0 saving the last checkpoint, say) can leave that one hanging."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# 11. (optional) The command line
# ----------------------------------------------------------------------------------------------
# What it adds: a flag for every setting of section 1, each checked as it is parsed (a wrong value
# is one line, exit 2), and the two ways a run can begin from a checkpoint:
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
TRAIN_HINT = "python train.py --model_type gpt-micro --dataset chinese"
# what --resume reads
RESUME_KEYS = ("model", "model_config", "tokenizer", "optimizer", "scaler", "iter_num",
               "best_val_loss", "train_args", "rng", "data_state", "history", "init_from")


def device_flag(name):
    """An argparse `type=` for --device: auto, or a device torch can use here — a typo or a missing
    GPU is one line now, not a traceback later. sample.py uses it too."""
    if name != "auto":
        try:
            torch.empty(0, device=name)          # torch itself says whether the device is usable
        except (RuntimeError, AssertionError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = reason if len(reason) < 60 else reason[:57] + "…"
            raise argparse.ArgumentTypeError(
                f"{name} is not a device torch can use here ({reason}) — "
                f"use auto, cpu, cuda, cuda:N or mps") from None
    return name


def read_checkpoint(path, need=("model", "model_config", "tokenizer")):
    """torch.load(weights_only=True), with every way it can fail said in one line."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a run folder — give a checkpoint in it, "
                         f"e.g. {path / 'best_model.pt'}")
    if not path.is_file():
        raise InputError(f"no checkpoint at {path} — train one with: {TRAIN_HINT}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive, which starts with "PK\3\4" (very old torch: a raw pickle,
    # which starts with the byte 0x80). Anything else is not a checkpoint at all.
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise InputError(f"{path} is not a checkpoint (not a file torch.save wrote) — give a .pt "
                         f"file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):
            raise InputError(f"{path} holds pickled Python objects, which weights_only loading "
                             f"refuses (they could run code); this project's checkpoints hold "
                             f"only tensors and plain data") from None
        raise InputError(f"{path} is truncated or damaged ({type(e).__name__}) — "
                         f"was it being saved when the run stopped? Use another checkpoint, "
                         f"e.g. last.pt") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path} is not a checkpoint of this project "
                         f"(it lacks: {', '.join(missing)})")
    return ckpt


def parse_flags(argv):
    """The flags on the command line, as {setting: value} — only those given (no defaults: those
    are Settings', or the checkpoint's) — and the two ways to begin: (given, resume, init_from)."""
    p = bpe.ArgumentParser(prog="train.py", argument_default=argparse.SUPPRESS,
                           description="Train a GPT from scratch (see the lesson's docstring).")
    count = bpe.number_flag(int, "≥ 1", lambda n: n >= 1)
    whole = bpe.number_flag(int, "≥ 0", lambda n: n >= 0)
    positive = bpe.number_flag(float, "> 0", lambda x: x > 0)
    non_negative = bpe.number_flag(float, "≥ 0", lambda x: x >= 0)
    fraction = bpe.number_flag(float, "in [0, 1)", lambda x: 0 <= x < 1)
    a = p.add_argument
    a("--model_type", choices=list(PRESETS),
      help="model size (gpt.py's PRESETS; default gpt-micro)")
    a("--dataset", help="chinese (default) | wikitext | wikitext2 | shakespeare | "
                        "a .txt/.jsonl file or folder | NAME for data/raw/NAME/")
    a("--tokenizer", help="bpe (train our own; default) | gpt2 | cl100k_base | a saved BPE's path")
    a("--vocab_size", type=bpe.VOCAB_SIZE_FLAG,
      help="vocabulary size when --tokenizer bpe (default 8192)")
    a("--data_dir", type=bpe.folder_flag,
      help="where raw downloads and token files live (default data)")
    a("--max_mb", type=bpe.MAX_MB_FLAG,
      help="tokenize at most this many MB of text (quick first runs)")
    a("--num_proc", type=count, help="tokenizing threads (default: all cores)")
    a("--block", choices=["gpt2", "llama"],
      help="GPT-2's block, or Llama's: RMSNorm, RoPE, SwiGLU, GQA")
    a("--n_kv_head", type=count,
      help="the llama block's key/value heads (default: one per query head)")
    a("--block_size", type=count, help="context length in tokens")
    a("--dropout", type=fraction, help="dropout rate (default 0; 0.1–0.2 helps on small data)")
    a("--bias", type=int, choices=[0, 1], help="biases in Linear and LayerNorm layers (default 1)")
    a("--max_iters", type=count, help="number of optimizer steps (overrides --epochs)")
    a("--epochs", type=positive, help="train this many passes over the training tokens")
    a("--batch_size", type=count, help="sequences per micro-batch (per process)")
    a("--grad_accum", "--gradient_accumulation_steps", type=count,
      help="micro-batches per optimizer step (default 1; the second name is LLM Learning's)")
    a("--optimizer", choices=["adamw", "muon"],
      help="adamw, or muon for the blocks' matrices (+ adamw)")
    a("--lr", type=positive, help="peak learning rate (AdamW's)")
    a("--muon_lr", type=positive, help="Muon's peak learning rate (default 0.02)")
    a("--min_lr", type=non_negative, help="learning rate at the end of the cosine (default lr/10)")
    a("--warmup_iters", type=whole, help="steps of linear warm-up")
    a("--lr_decay_iters", type=count, help="length of the cosine schedule (default: the run's)")
    a("--weight_decay", type=non_negative,
      help="AdamW weight decay, on 2-D weights only (default 0.1)")
    a("--beta2", type=fraction,
      help="AdamW β2 (default 0.99 for the small presets, 0.95 for gpt2*)")
    a("--grad_clip", type=non_negative,
      help="clip the gradient norm to this (0 = off; default 1.0)")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast precision (default auto)")
    a("--device", type=device_flag, help="auto (default) | cpu | cuda | cuda:N | mps")
    a("--compile", action="store_true",
      help="torch.compile the model (faster on a GPU after a warm-up)")
    a("--eval_interval", type=count, help="evaluate and save last.pt every N steps (default 250)")
    a("--eval_iters", type=count, help="batches per evaluation estimate (default 20)")
    a("--log_interval", type=count, help="print a progress line every N steps (default 10)")
    a("--sample_every", type=whole,
      help="print and log a short sample at every N-th evaluation (default 0: never)")
    a("--sample_prompt",
      help="its prompt (default: the first line of the validation text, 20 characters)")
    a("--sample_tokens", type=count, help="its length in tokens (default 60)")
    a("--out_dir", type=bpe.folder_flag, help="the run folder (default checkpoints/<model_type>)")
    a("--seed", type=int, help="seed for weights, data order and dropout (default 1337)")
    a("--resume", action="store_true", help="continue the run in --out_dir/last.pt, exactly")
    a("--init_from", help="start a new run from this checkpoint's weights, shape and tokenizer")
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
    fields = {f.name for f in dataclasses.fields(Settings)}
    saved = {k: v for k, v in ckpt["train_args"].items() if k in fields}
    saved.update({k: ckpt["model_config"].get(k, getattr(GPTConfig, k))
                  for k in MODEL_CONFIG_FLAGS})
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
    model_type = ckpt["train_args"].get("model_type", Settings.model_type)
    shape = {k: ckpt["model_config"].get(k, getattr(GPTConfig, k))
             for k in ("block", "n_kv_head", "bias")}
    return new_settings(**{"block_size": context, **given, "model_type": model_type, **shape})


def main(argv=None):
    """python train.py [flags]: parse, read the checkpoint a run begins from, train. Errors become
    one line (bpe.run_command)."""
    given, resume, init_from = parse_flags(sys.argv[1:] if argv is None else list(argv))
    if resume:
        path = pathlib.Path(given.get("out_dir") or new_settings(**given).out_dir) / "last.pt"
        if not path.exists():
            raise InputError(f"--resume, but there is no {path} — start without --resume, or give "
                             f"the --out_dir of the run to continue")
        ckpt = read_checkpoint(path, need=RESUME_KEYS)
        train(resumed_settings(given, ckpt, path), resume=ckpt)
    elif init_from:
        ckpt = read_checkpoint(init_from)
        train(started_settings(given, ckpt, init_from), start={**ckpt, "path": init_from})
    else:
        train(new_settings(**given))


if __name__ == "__main__":
    sys.exit(bpe.run_command(main))
