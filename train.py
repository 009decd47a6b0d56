"""Lesson 5 — training: the whole loop in plain code.

What you will learn here, top to bottom:
  1. the command line: every knob of a training run, with a default that works on a CPU;
  2. device and precision: CUDA / MPS / CPU, bfloat16 or float16 autocast, and why float16
     needs a GradScaler while bfloat16 does not;
  3. the optimizer (AdamW, weight decay only on matrices) and the learning-rate schedule
     (linear warm-up, then cosine decay);
  4. one optimisation step: gradient accumulation over micro-batches, unscaling, clipping;
  5. evaluation in nats/token, perplexity and bits per byte (comparable across tokenizers);
  6. checkpoints written atomically, and an *exact* resume: model, optimizer, scaler, data
     position and every random number generator come back as they were;
  7. the loop itself — a visible `while`, no trainer class — with logging, a loss plot,
     clean stops on Ctrl-C / SIGTERM, and multi-GPU training with DDP (torchrun).

You need: gpt.py (the model), bpe.py (tokenizers), data.py (token files and batches).
Next lesson: sample.py turns the checkpoint this file writes back into text.

    python train.py --model_type gpt-micro --dataset chinese --tokenizer bpe --max_iters 2000
    python train.py --model_type gpt-micro --dataset chinese --tokenizer bpe --resume
    torchrun --nproc_per_node 2 train.py --model_type gpt-mini --dataset chinese
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import data
from gpt import GPT, PRESETS, GPTConfig, strip_wrapper_prefixes


# ----------------------------------------------------------------------------------------------
# 1. The command line
# ----------------------------------------------------------------------------------------------

# What each preset trains well with when a flag is not given. nano/micro/mini are sized for a
# CPU (a few thousand iterations in minutes to an hour); gpt-small and the GPT-2 sizes want a GPU
# (for GPT-2's ~0.5M tokens per step, add --grad_accum 40 as nanoGPT does).
PRESET_DEFAULTS = {
    "gpt-nano":    dict(block_size=64,   batch_size=32, lr=2e-3, max_iters=2000, warmup_iters=100),
    "gpt-micro":   dict(block_size=128,  batch_size=32, lr=1e-3, max_iters=5000, warmup_iters=100),
    "gpt-mini":    dict(block_size=256,  batch_size=32, lr=1e-3, max_iters=5000, warmup_iters=200),
    "gpt-small":   dict(block_size=512,  batch_size=16, lr=6e-4, max_iters=20000, warmup_iters=500),
    "gpt2":        dict(block_size=1024, batch_size=12, lr=6e-4, max_iters=600000, warmup_iters=2000),
    "gpt2-medium": dict(block_size=1024, batch_size=12, lr=3e-4, max_iters=600000, warmup_iters=2000),
    "gpt2-large":  dict(block_size=1024, batch_size=8,  lr=2.5e-4, max_iters=600000, warmup_iters=2000),
    "gpt2-xl":     dict(block_size=1024, batch_size=4,  lr=2e-4, max_iters=600000, warmup_iters=2000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a GPT from scratch (see the module docstring).")
    a = p.add_argument
    a("--model_type", default="gpt-micro", choices=list(PRESETS), help="model size preset (gpt.py PRESETS)")
    a("--dataset", default="chinese", help="chinese | wikitext | wikitext2 | shakespeare | a .txt/.jsonl file or folder")
    a("--tokenizer", default="bpe", help="gpt2 | cl100k_base | bpe (train our own BPE once) | path to a saved BPE")
    a("--vocab_size", type=int, default=8192, help="vocabulary size when --tokenizer bpe")
    a("--data_dir", default="data", help="where raw downloads and token files live")
    a("--max_mb", type=float, default=None, help="tokenize at most this many MB of text (quick first runs)")
    a("--epochs", type=float, default=None, help="train this many passes over the training tokens")
    a("--max_iters", type=int, default=None, help="number of optimizer steps (overrides --epochs)")
    a("--lr_decay_iters", type=int, default=None, help="length of the cosine schedule (default: the run's length)")
    a("--batch_size", type=int, default=None, help="sequences per micro-batch (per GPU)")
    a("--block_size", type=int, default=None, help="context length in tokens")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate")
    a("--min_lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)")
    a("--warmup_iters", type=int, default=None, help="steps of linear warm-up")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay, on 2-D weights only")
    a("--beta2", type=float, default=None, help="AdamW β2 (default 0.99 for the small presets, 0.95 for gpt2*)")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--dropout", type=float, default=0.0, help="dropout rate (0.1–0.2 helps on small data)")
    a("--bias", type=int, default=1, choices=[0, 1], help="biases in Linear and LayerNorm layers")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="autocast precision")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    a("--compile", action="store_true", help="torch.compile the model (faster on GPU after a warm-up)")
    a("--eval_interval", type=int, default=250, help="evaluate and save last.pt every N steps")
    a("--eval_iters", type=int, default=20, help="batches per evaluation estimate")
    a("--log_interval", type=int, default=10, help="print a progress line every N steps")
    a("--out_dir", default=None, help="checkpoint folder (default checkpoints/<model_type>)")
    a("--resume", action="store_true", help="continue exactly from out_dir/last.pt")
    a("--seed", type=int, default=1337, help="seed for weights, data order and dropout")
    a("--num_proc", type=int, default=None, help="parallel tokenizing workers (default: all cores)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                 "max_iters", "vocab_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be at least 1, not {value}")
    if args.beta2 is None:
        # β2 = 0.99 averages the squared gradients over ~100 steps: steadier for the small, noisy
        # batches of a CPU run; large batches on GPUs take 0.95 (nanoGPT's GPT-2 setting).
        args.beta2 = 0.95 if args.model_type.startswith("gpt2") else 0.99
    for key, value in PRESET_DEFAULTS[args.model_type].items():
        if key != "max_iters" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.out_dir is None:
        args.out_dir = os.path.join("checkpoints", args.model_type)
    return args


class TrainError(Exception):
    """A problem the user can fix; main() prints it as one line and exits 1."""


# ----------------------------------------------------------------------------------------------
# 2. Device and precision
# ----------------------------------------------------------------------------------------------

def pick_device(name):
    """'auto' → cuda, then mps, then cpu; an explicit choice is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch sees no CUDA GPU — use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainError("--device mps, but this torch has no Apple-GPU support — use --device cpu")
    return name


def pick_dtype(name, device):
    """float32 on CPU unless asked; on a GPU bfloat16 if supported, else float16.

    bfloat16 keeps float32's 8 exponent bits (same range, fewer digits), so gradients never
    underflow. float16 has only 5 exponent bits: small gradients round to 0, which is why it
    needs a GradScaler (below).
    """
    if name != "auto":
        return name
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast_context(device, dtype):
    """Matmuls in the low-precision dtype, reductions (softmax, loss) kept in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else device
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# Dense bf16/fp16 tensor-core peaks, in FLOP/s, from the vendors' data sheets (no sparsity).
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


# ----------------------------------------------------------------------------------------------
# 3. Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------------

def make_optimizer(model, args, device):
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only.

    Decay pulls weights towards 0, a regulariser for the matrices that do the work; biases and
    LayerNorm gains are few, scale-setting parameters, and decaying them only hurts.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused=True: one kernel updates every tensor instead of a loop of small ops per tensor.
    # It exists on CUDA, and on CPU from torch 2.4; elsewhere we fall back to the loop.
    try:
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=True)
    except (RuntimeError, TypeError):                          # older torch, or MPS
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2))


def learning_rate(it, args, total_iters):
    """Linear warm-up from 0 to lr over warmup_iters, then cosine decay to min_lr.

    Warm-up: Adam's moment estimates are noisy for the first steps, and large early updates
    can wreck the fresh model. Cosine: big steps while far from a minimum, small steps to
    settle into it; lr(t) = min_lr + ½(1 + cos(π·t))·(lr − min_lr), t going 0 → 1.
    """
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or total_iters
    if it >= decay_iters:
        return args.min_lr
    t = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------------------------
# 4. One optimisation step
# ----------------------------------------------------------------------------------------------

def forward_backward(model, next_batch, grad_accum, autocast_ctx, scaler, ddp=False):
    """Run grad_accum micro-batches, accumulating their gradients; return the mean loss.

    Gradients add up across backward() calls. Each micro-batch's loss is a *mean* over its
    tokens, so dividing it by grad_accum makes the sum of the micro-gradients equal the
    gradient of the mean over the whole (batch_size × grad_accum) batch — the same step a
    single big batch would take, in a fraction of the memory.
    """
    total = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()
        # DDP all-reduces gradients inside backward(); doing that once, on the last micro-
        # batch, instead of after every one, saves grad_accum − 1 rounds of communication.
        last = micro == grad_accum - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        with sync:
            with autocast_ctx:
                _, loss = model(x, y)
            loss = loss / grad_accum
            # The scaler multiplies the loss by S (e.g. 65536) so float16 gradients stay
            # above underflow; it divides them back before the optimizer sees them.
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale, clip, step, update the scale. Returns (grad norm, whether the step was taken)."""
    # Clipping must see the true gradients, so unscale first (a no-op without float16).
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scale_before = scaler.get_scale()
    # With float16 an inf/NaN gradient means the scale was too high: the scaler skips the
    # step and halves S. With bfloat16/float32 the scaler is disabled and always steps.
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    stepped = not scaler.is_enabled() or scaler.get_scale() >= scale_before
    return norm, stepped


# ----------------------------------------------------------------------------------------------
# 5. Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, tokens_by_split, args, device, autocast_ctx, seed):
    """Mean loss over eval_iters random batches of each split.

    The batches come from a generator with a fixed seed, never from the global RNG: every
    evaluation then measures the same batches (so "best" means better, not luckier), and it
    cannot shift the random numbers the training draws (dropout) — which is what keeps a
    resumed run identical to an uninterrupted one.
    """
    model.eval()
    out = {}
    for split, tokens in tokens_by_split.items():
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(args.eval_iters)
        for i in range(args.eval_iters):
            x, y = data.get_batch(tokens, args.block_size, args.batch_size, g, device)
            with autocast_ctx:
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def bits_per_byte(nats_per_token, tokens, n_bytes):
    """nats/token → bits/byte: × tokens/byte, ÷ ln 2. Tokenizer-independent, so comparable."""
    return nats_per_token * tokens / n_bytes / math.log(2)


# ----------------------------------------------------------------------------------------------
# 6. Checkpoints and exact resume
# ----------------------------------------------------------------------------------------------

def save_atomically(obj, path):
    """Write to path.tmp, then rename: a crash mid-write never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)                                      # atomic on POSIX and Windows


def rng_state():
    """Every random number generator a step draws from."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        # this process's own GPU: under DDP each rank saves and restores the same stream
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state):
    """Put every generator back where rng_state() found it."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tokenizer_entry(meta):
    """What a checkpoint stores to rebuild the tokenizer: the name of a tiktoken encoding, or
    our own BPE in full (ranks, pattern, special tokens), so the checkpoint is self-contained."""
    name = meta["tokenizer"]
    if name in ("gpt2", "cl100k_base"):
        return {"name": name}
    return bpe.BPETokenizer.load(name).to_dict()


def load_resume_checkpoint(path, args):
    """Load last.pt, refusing one from another model, dataset or tokenizer."""
    if not os.path.exists(path):
        raise TrainError(f"--resume, but there is no checkpoint at {path} — start without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path} is not a readable checkpoint ({type(e).__name__}) — delete it or pick another --out_dir")
    missing = [k for k in ("model", "optimizer", "scaler", "iter_num", "best_val_loss", "train_args", "rng",
                           "data_state") if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)}: not a resume point written by train.py — "
                         f"start without --resume in another --out_dir")
    old = ckpt["train_args"]
    for key in ("model_type", "dataset", "tokenizer", "vocab_size", "block_size", "bias"):
        if key == "vocab_size" and old.get("tokenizer") != "bpe":
            continue
        if old.get(key) != getattr(args, key):
            raise TrainError(f"{path} was trained with --{key} {old.get(key)}, not {getattr(args, key)} — "
                             f"resume with the same setting, or use another --out_dir")
    return ckpt


# ----------------------------------------------------------------------------------------------
# 7. Progress: log lines, log.jsonl and loss.svg
# ----------------------------------------------------------------------------------------------

def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def write_loss_svg(path, train_points, val_points, width=640, height=360, pad=48):
    """A plain SVG line chart of (iteration, loss) points: train in blue, val in orange."""
    points = train_points + val_points
    if not points:
        return
    x_max = max(1, max(p[0] for p in points))
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    y_span = (y_max - y_min) or 1.0

    def xy(it, loss):                                          # data → pixel coordinates
        return (pad + it / x_max * (width - 2 * pad),
                height - pad - (loss - y_min) / y_span * (height - 2 * pad))

    def polyline(pts, colour):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in pts))
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">iteration (0 … {x_max})</text>',
             f'<text x="6" y="{pad - 8}">loss {y_max:.3f}</text>',
             f'<text x="6" y="{height - pad + 16}">{y_min:.3f}</text>',
             polyline(train_points, "#1f77b4"), polyline(val_points, "#ff7f0e"),
             f'<text x="{width - pad - 110}" y="{pad}" fill="#1f77b4">train loss</text>',
             f'<text x="{width - pad - 110}" y="{pad + 16}" fill="#ff7f0e">val loss</text>',
             "</svg>"]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# 8. Stopping cleanly
# ----------------------------------------------------------------------------------------------

class StopFlag:
    """Set by Ctrl-C (SIGINT) or SIGTERM; the loop checks it after each step, so the step in
    flight finishes and the checkpoint written is consistent."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:                                     # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt …", flush=True)


# ----------------------------------------------------------------------------------------------
# 9. The training run
# ----------------------------------------------------------------------------------------------

def setup_distributed(device):
    """Under torchrun (RANK set), join the process group: NCCL between GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return False, 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "mps":
        raise TrainError("DDP needs CUDA GPUs (nccl) or CPUs (gloo); MPS cannot all-reduce — use one process")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # A long timeout: the other ranks wait at a barrier while rank 0 downloads and tokenizes.
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(hours=6))
    return True, rank, world, device


def prepare_data(args, master):
    """Tokenize once (rank 0 only; the others wait), then open the token files."""
    if master:
        folder = data.prepare(args.dataset, args.tokenizer, data_dir=args.data_dir, max_mb=args.max_mb,
                              num_proc=args.num_proc, vocab_size=args.vocab_size, verbose=True)
    if dist.is_initialized():
        dist.barrier()
    if not master:
        folder = data.prepare(args.dataset, args.tokenizer, data_dir=args.data_dir, max_mb=args.max_mb,
                              num_proc=args.num_proc, vocab_size=args.vocab_size, verbose=False)
    meta = data.load_meta(folder)
    return meta, data.load_tokens(folder, "train"), data.load_tokens(folder, "val")


def train(args, argv=()):
    device = pick_device(args.device)
    ddp, rank, world, device = setup_distributed(device)
    master = rank == 0                                         # only rank 0 prints and writes files
    dtype = pick_dtype(args.dtype, device)
    if device.startswith("cuda"):
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa — ~8× faster, and
        # precise enough for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    meta, train_tokens, val_tokens = prepare_data(args, master)
    batches = data.BatchIterator(train_tokens, args.block_size, args.batch_size, seed=args.seed,
                                 rank=rank, world_size=world, device=device)
    iters_per_epoch = max(1, batches.steps_per_epoch // args.grad_accum)
    if args.max_iters is not None:
        total_iters = args.max_iters
    elif args.epochs is not None:
        total_iters = max(1, round(args.epochs * iters_per_epoch))
    else:
        total_iters = PRESET_DEFAULTS[args.model_type]["max_iters"]

    config = GPTConfig.from_preset(args.model_type, vocab_size=meta["vocab_size"], block_size=args.block_size,
                                   dropout=args.dropout, bias=bool(args.bias))
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, args, device)
    # The scaler is only active for float16; for other dtypes every call passes straight through.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))
    iter_num, best_val_loss, history = 0, float("inf"), {"train": [], "val": []}
    os.makedirs(args.out_dir, exist_ok=True)
    last_path = os.path.join(args.out_dir, "last.pt")
    best_path = os.path.join(args.out_dir, "best_model.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")

    if args.resume:
        ckpt = load_resume_checkpoint(last_path, args)
        model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        history = ckpt.get("history", history)
        batches.load_state_dict(ckpt["data_state"])
        set_rng_state(ckpt["rng"])
        if master:
            print(f"resumed from {last_path} at iteration {iter_num}")
    elif os.path.exists(last_path):
        # Nothing the user had is lost: a fresh run would overwrite last.pt and best_model.pt.
        raise TrainError(f"{args.out_dir} already holds a run (last.pt) — add --resume to continue it, "
                         f"or choose another --out_dir (or delete that folder) to start afresh")
    elif master and os.path.exists(log_path):
        os.remove(log_path)                                    # a fresh run starts a fresh log

    raw_model = model                                          # un-wrapped: what we save
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    autocast_ctx = autocast_context(device, dtype)
    tok_entry = tokenizer_entry(meta)
    peak = gpu_peak_flops(device)
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * world

    def checkpoint():
        return {"model": raw_model.state_dict(), "model_config": config.to_dict(), "tokenizer": tok_entry,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "iter_num": iter_num, "epoch": batches.epoch, "best_val_loss": best_val_loss,
                "train_args": vars(args), "rng": rng_state(), "data_state": batches.state_dict(),
                "history": history}

    def log(record):
        if master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    stop = StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    if master:
        print(f"model {args.model_type}: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
              f"vocab {config.vocab_size}, context {config.block_size} | device {device}, {dtype} | "
              f"{tokens_per_iter:,} tokens/step, {iters_per_epoch} steps/epoch, {total_iters} steps")
    model.train()
    t_last, iters_timed, t_start = time.time(), 0, time.time()
    try:
        while True:
            # -- evaluate and save (also at the last iteration) ---------------------------------
            already_evaluated = bool(history["val"]) and history["val"][-1][0] == iter_num   # just resumed
            if (iter_num % args.eval_interval == 0 or iter_num == total_iters) and not already_evaluated:
                losses = estimate_loss(model, {"train": train_tokens, "val": val_tokens}, args, device,
                                       autocast_ctx, seed=args.seed + 1000 * rank)
                if ddp:                                        # average the ranks' estimates
                    t = torch.tensor([losses["train"], losses["val"]], device=device)
                    dist.all_reduce(t)
                    losses = {"train": t[0].item() / world, "val": t[1].item() / world}
                if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
                    raise TrainError(f"eval loss is not finite at iteration {iter_num} — training diverged; "
                                     f"the checkpoints in {args.out_dir} were left as they were. Try a lower --lr")
                bpb = bits_per_byte(losses["val"], meta["val_tokens"], meta["val_bytes"])
                history["train"].append((iter_num, losses["train"]))
                history["val"].append((iter_num, losses["val"]))
                if master:
                    print(f"eval {iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f} nats/token, "
                          f"val perplexity {math.exp(min(losses['val'], 50)):.2f}, val {bpb:.4f} bits/byte")
                    log({"type": "eval", "iter": iter_num, "epoch": batches.epoch, "train_loss": losses["train"],
                         "val_loss": losses["val"], "val_ppl": math.exp(min(losses["val"], 50)), "val_bpb": bpb})
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    state = checkpoint()
                    save_atomically(state, last_path)
                    if improved:
                        save_atomically(state, best_path)
                    write_loss_svg(os.path.join(args.out_dir, "loss.svg"), history["train"], history["val"])
                t_last, iters_timed = time.time(), 0            # tokens/s counts training time only
            if iter_num >= total_iters or stop.requested:
                break

            # -- one optimisation step ------------------------------------------------------------
            lr = learning_rate(iter_num, args, total_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = forward_backward(model, batches.next_batch, args.grad_accum, autocast_ctx, scaler, ddp)
            norm, stepped = optimizer_step(model, optimizer, scaler, args.grad_clip)
            loss = loss.item()                                  # waits for the GPU: once per step
            if ddp:
                # Every rank must leave the loop at the same step, or the others would wait
                # forever in the next all-reduce: agree on "stop?" and "diverged?" together.
                flags = torch.tensor([float(stop.requested), float(not math.isfinite(loss))], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop.requested = bool(flags[0])
                if flags[1]:
                    loss = float("nan")
            # With float16 a non-finite loss can be a transient overflow the scaler handles by
            # skipping the step; there we leave the verdict to the next evaluation.
            if not math.isfinite(loss) and dtype != "float16":
                raise TrainError(f"loss is {loss} at iteration {iter_num} — training diverged. Nothing was saved "
                                 f"after iteration {history['val'][-1][0] if history['val'] else 0}; "
                                 f"try a lower --lr (now {args.lr}) or --dtype float32/bfloat16")
            iter_num += 1
            iters_timed += 1

            # -- progress ------------------------------------------------------------------------
            if iter_num % args.log_interval == 0 and ddp:
                t = torch.tensor(loss, device=device)          # every rank's loss → their mean
                dist.all_reduce(t)
                loss = t.item() / world
            if iter_num % args.log_interval == 0 and master:
                now = time.time()
                dt = (now - t_last) / iters_timed
                t_last, iters_timed = now, 0
                tokens_per_s = tokens_per_iter / dt
                # MFU = achieved FLOP/s ÷ the GPU's peak: (6N + 12·L·C·T) FLOPs per token × tokens/s.
                mfu = raw_model.flops_per_token() * tokens_per_s / world / peak if peak else None
                eta = (total_iters - iter_num) * dt
                print(f"iter {iter_num}/{total_iters} | epoch {batches.epoch} | loss {loss:.4f} | lr {lr:.2e} | "
                      f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu * 100:.1f}%" if mfu else "") +
                      ("" if stepped else " | fp16 step skipped") + f" | ETA {format_duration(eta)}", flush=True)
                log({"type": "train", "iter": iter_num, "epoch": batches.epoch, "loss": loss, "lr": lr,
                     "grad_norm": float(norm), "tokens_per_s": tokens_per_s, "mfu": mfu, "step_skipped": not stepped,
                     "elapsed_s": now - t_start})
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if master:
        if stop.requested and iter_num < total_iters:
            save_atomically(checkpoint(), last_path)
            launcher = ["torchrun", "--nproc_per_node", str(world)] if ddp else ["python"]
            resume_cmd = shlex.join(launcher + ["train.py"] + [a for a in argv if a != "--resume"] + ["--resume"])
            print(f"stopped at iteration {iter_num}; saved {last_path}. Resume with:\n  {resume_cmd}")
        else:
            print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}; "
                  f"checkpoints in {args.out_dir} — sample with: python sample.py --checkpoint {best_path}")
    if ddp:
        dist.barrier()                                         # leave together: no rank tears down early
        dist.destroy_process_group()
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "history": history}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return train(args, argv)
    except (TrainError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
