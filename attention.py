"""Lesson 1 — attention: the one idea a transformer is built on.

What you will learn here, numbered as the section banners:
  1. scaled dot-product attention written out as the formula softmax(q·kᵀ/√d + mask)·v,
     with the causal mask (and the offset it needs once a KV cache is in play);
  2. LayerNorm and GELU written out, so nothing in the model is a black box (the modules
     then call torch's fused versions of the very same formulas: test_all.py holds each fused
     one to its written-out twin, here and in section 6);
  3. the MLP (feed-forward) sub-layer;
  4. multi-head causal self-attention: one fused q/k/v projection, splitting into heads,
     merging back, and a KV cache that makes generation fast;
  5. the transformer Block: pre-LayerNorm residual wiring of the two sub-layers;
  6. the modern block of Llama, Qwen and their kin: RMSNorm, rotary position embeddings (RoPE),
     the SwiGLU MLP and grouped-query attention (GQA), wired like GPT-2's.
Optional sections: none — every line here is the lesson.

You need: Python and a little PyTorch (tensors, nn.Module). Nothing of ours comes before this.
Next lesson: gpt.py stacks these Blocks into a whole language model.

Shape legend used in comments: B batch, T time (sequence length), C channels (n_embd),
H heads, D = C / H the width of one head, Hkv key/value heads (section 6).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Scaled dot-product attention, written out
# ----------------------------------------------------------------------------------------------

def causal_mask(Tq, Tk, device=None):
    """Boolean (Tq, Tk) matrix: True where query i may look at key j.

    Queries are the *last* Tq of the Tk positions (Tq < Tk when earlier keys come from a
    KV cache), so query i sits at absolute position (Tk − Tq + i) and may see keys 0 … that.
    """
    offset = Tk - Tq                                             # how many keys come before query 0
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    return allowed.tril(diagonal=offset)                         # keep j ≤ i + offset


def softmax(scores, dim=-1):
    """softmax(s)_j = e^(s_j) / Σ_k e^(s_k), computed without overflow.

    Subtracting the row maximum first changes nothing mathematically (the factor e^(−max)
    cancels between numerator and denominator) but keeps every exponent ≤ 0, so e^x never
    overflows to inf even for large logits. Rows that are entirely −inf are not expected here:
    the causal mask always leaves a query at least its own key.
    """
    shifted = scores - scores.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0):
    """softmax(q·kᵀ / √d + mask) · v, written out.

    q: (B, H, Tq, D)   k, v: (B, H, Tk, D)   returns (B, H, Tq, D).
    With a KV cache Tq ≤ Tk and the queries are the last Tq positions (see causal_mask).
    dropout_p randomly zeroes attention weights while training (and rescales the rest by
    1/(1−p) so the expected output is unchanged); pass 0.0 at evaluation time.
    """
    D = q.size(-1)
    # Every query against every key. If q and k have unit-variance entries, q·k sums D such
    # products and has variance D; dividing by √D brings it back to ≈ 1, so the softmax does
    # not saturate into a one-hot as heads get wider.
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)           # (B, H, Tq, Tk)
    if causal:
        allowed = causal_mask(q.size(-2), k.size(-2), device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))  # e^(−∞) = 0: no weight on the future
    # bfloat16/float16 scores are exponentiated and summed in (at least) float32: with 8 or 11
    # bits of mantissa, a sum of many small probabilities would drift. float64 stays float64.
    # Each row of weights sums to 1.
    weights = softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    weights = weights.to(v.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ v                                           # weighted average of the values


# ----------------------------------------------------------------------------------------------
# 2. LayerNorm and GELU, written out
# ----------------------------------------------------------------------------------------------

def layer_norm(x, weight, bias=None, eps=1e-5):
    """y = (x − mean) / √(var + ε) · γ + β, over the last dimension of x.

    Normalising each token's feature vector to mean 0, variance 1 keeps activations at a
    steady scale however deep the stack gets; γ (weight) and β (bias) let the model undo that
    where it helps. ε guards against dividing by zero for a constant vector.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)  # population variance (÷C, not ÷(C−1))
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


class LayerNorm(nn.Module):
    """LayerNorm with learnable γ (weight) and optional β (bias); `bias=False` drops β.

    forward() calls torch's fused F.layer_norm: layer_norm() above,
    but one kernel instead of eight, which matters when the model is small and every op's
    overhead shows.
    """

    def __init__(self, ndim, bias=True, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))             # γ starts at 1: identity scale
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):                                        # (..., C) → (..., C)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def gelu(x):
    """GELU(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2)), Φ being the standard normal's CDF.

    A smooth ReLU: each input is kept in proportion to how likely a standard normal variable
    is to fall below it, so small negative inputs leak through a little and gradients stay alive.
    """
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """GPT-2's approximation of GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    It was cheaper than erf on 2018 hardware; today torch's exact GELU is the faster kernel on
    a CPU (1.5–3.5× its tanh form here, by shape), and the two differ by < 0.001, so our MLP uses
    the exact form.
    OpenAI's GPT-2 weights were trained with this form; loading them would call for it.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# ----------------------------------------------------------------------------------------------
# 3. The MLP: where each token "thinks" on its own
# ----------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear C → 4C, GELU, Linear 4C → C, dropout. Applied to every position independently.

    Attention moves information *between* tokens; the MLP transforms it *within* a token.
    The 4× hidden width is the original Transformer's (Vaswani et al. 2017), kept by GPT-2.
    """

    def __init__(self, n_embd, dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        # a residual projection (see gpt.py init)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):                                        # (B, T, C)
        # F.gelu computes exactly gelu() above, in one fused kernel.
        h = F.gelu(self.c_fc(x))                                 # (B, T, 4C)
        return self.dropout(self.c_proj(h))                      # (B, T, C)


# ----------------------------------------------------------------------------------------------
# 4. Multi-head causal self-attention, with a KV cache
# ----------------------------------------------------------------------------------------------

class KVCache:
    """The keys and values of every position seen so far, for each layer.

    When generating, token t+1 needs attention over positions 0…t+1, but the keys and values
    of 0…t never change (causal attention never lets them see a later token). Keeping them
    means each new token costs one row of work instead of recomputing the whole sequence.
    The buffers are allocated once at full size (max_len positions) and filled in place:
    appending by torch.cat would copy the whole cache at every step.
    """

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.keys = [None] * n_layer                             # each (B, H or Hkv, max_len, D)
        self.values = [None] * n_layer
        self.filled = [0] * n_layer                              # positions written, per layer

    def length(self):
        """How many positions are cached (what layer 0 holds; 0 before the first forward)."""
        return self.filled[0]

    def append(self, layer, k, v):
        """Write k, v (B, H, T, D) after the cached positions; return all of them so far."""
        B, H, T, D = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(B, H, self.max_len, D)
            self.values[layer] = v.new_empty(B, H, self.max_len, D)
        start, end = self.filled[layer], self.filled[layer] + T
        assert end <= self.max_len, f"KV cache holds {self.max_len} positions; {end} asked"
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.filled[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]   # (B, H, end, D)


def attend(q, k, v, dropout_p=0.0, flash=True):
    """Causal attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D) → (B, H, Tq, D).

    Hkv = H, except in grouped-query attention (section 6), where each group of H / Hkv query
    heads shares one key/value head. flash=True runs torch's fused kernel, flash=False our
    written-out function: the same numbers, to float rounding.
    """
    Tq, Tk, group = q.size(2), k.size(2), q.size(1) // k.size(1)
    if flash:
        # Same math as our function, fused into one kernel that never materialises the
        # (Tq, Tk) score matrix (FlashAttention on CUDA, when no mask is passed). Its is_causal
        # flag assumes Tq == Tk; for a cached block (Tq < Tk) we pass our offset mask instead,
        # and for the single newest query (Tq == 1), which may see every key, no mask at all.
        mask = causal_mask(Tq, Tk, device=q.device) if 1 < Tq < Tk else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=Tq == Tk, enable_gqa=group > 1)
    if group > 1:                                                # each key/value head, once per
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # query head
    return scaled_dot_product_attention(q, k, v, causal=True, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and the tokens before it.

    H heads of width D = C / H run side by side, each free to attend to different things
    (one to the previous word, one to the subject of the sentence, …); their outputs are
    concatenated back to width C and mixed by an output projection.
    """

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd ({n_embd}) must be divisible by n_head ({n_head})"
        self.n_head = n_head
        self.attn_dropout_p = dropout                            # a rate, applied to the weights
        # One matmul produces q, k and v for all heads at once: C → 3C (faster than three).
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)       # a residual projection
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        """x: (B, T, C) → (B, T, C).

        cache: a KVCache or None. With a cache, x holds only the *new* positions; their keys
        and values are appended to layer `layer`'s entry, and the queries attend to all of it.
        """
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)                 # 3 × (B, T, C)
        # Split each C into H heads of width D = C / H and move the head axis forward, so every
        # head is an independent (T, D) problem: (B, T, C) → (B, T, H, D) → (B, H, T, D).
        q = q.view(B, T, H, C // H).transpose(1, 2)
        k = k.view(B, T, H, C // H).transpose(1, 2)
        v = v.view(B, T, H, C // H).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(layer, k, v)                     # (B, H, T_cached + T, D)
        y = attend(q, k, v, self.attn_dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) → (B, T, H·D): merge heads
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------------------------
# 5. The transformer block
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    """x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).

    Pre-LayerNorm (GPT-2's order): each sub-layer reads a normalised copy and *adds* its
    result to the residual stream. The stream itself is never normalised inside the stack, so
    gradients flow from the loss to the first layer through the additions unchanged — this
    is what lets deep stacks train.
    """

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout, bias=bias)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x, cache=None, layer=0):                  # (B, T, C) → (B, T, C)
        x = x + self.attn(self.ln_1(x), cache=cache, layer=layer)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------------
# 6. The modern block: RMSNorm, rotary positions, SwiGLU, grouped-query attention
# ----------------------------------------------------------------------------------------------
# The open models of today — Llama, Qwen, Mistral, DeepSeek — keep GPT-2's wiring (pre-norm
# residual sub-layers) and change four parts, each a small idea:
#   RMSNorm  normalise by the root mean square alone: no mean to subtract, no bias;
#   RoPE     say where a token is by *rotating* its query and key, not by adding a learned vector
#            to its input: position then enters q·k only as how far apart the two tokens are;
#   SwiGLU   a gated MLP: one half of the hidden layer decides how much of the other gets through;
#   GQA      fewer key/value heads than query heads: a smaller KV cache, little loss in quality.
# And no biases anywhere.

def rms_norm(x, weight, eps=1e-5):
    """y = x / √(mean(x²) + ε) · γ, over the last dimension (Zhang & Sennrich 2019).

    LayerNorm's centring turns out not to matter; the rescaling to unit size does. So: one
    statistic instead of two, and no β. ε guards against dividing by zero, as in layer_norm.
    """
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain γ. forward() calls torch's fused F.rms_norm: rms_norm()
    above, in one kernel."""

    def __init__(self, ndim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))             # γ starts at 1: identity scale
        self.eps = eps

    def forward(self, x):                                        # (..., C) → (..., C)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# Rotary position embeddings (Su et al. 2021). Cut a head's D numbers into D/2 pairs
# (x_0, x_1), (x_2, x_3), … and read pair i as a point in a plane — as the complex number
# z_i = x_2i + j·x_2i+1. At position m, turn pair i by the angle m·θ_i: multiply z_i by
# e^(j·m·θ_i), a complex number of length 1. Turning q by mθ and k by nθ changes their dot
# product exactly as turning k alone by (n − m)θ would (a rotation keeps lengths and angles:
# R(a)ᵀR(b) = R(b − a)), so every score q_m·k_n depends on the tokens and on the distance n − m,
# never on where in the text the two sit. θ_i = base^(−2i/D) with base 10000 runs from 1 radian
# per position (pair 0: tells neighbours apart) down to 10000^(−(D−2)/D) (the last pair: about
# 1/5600 for gpt-micro's D = 32, changing over thousands of positions). Only q and k turn, not
# v: position should decide where to look, not what is carried.

def rope_tables(head_dim, max_len, base=10000.0):
    """cos(m·θ_i) and sin(m·θ_i) for every position m < max_len: two (max_len, D/2) tables."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)   # (D/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), theta)            # m·θ_i
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Turn every pair (x_2i, x_2i+1) of x (B, H, T, D) by its position's angle; cos, sin are the
    (T, D/2) rows of those positions. As complex numbers the turn is one multiplication:
    (a + jb)·(cos φ + j·sin φ) = (a·cos φ − b·sin φ) + j·(a·sin φ + b·cos φ)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, T, D/2) complex
    turned = pairs * torch.complex(cos, sin)                     # × e^(jmθ_i), broadcast over B, H
    return torch.view_as_real(turned).flatten(-2).type_as(x)     # back to (B, H, T, D), x's dtype


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with rotary positions and n_kv_head ≤ n_head key/value heads
    (Ainslie et al. 2023): each group of n_head / n_kv_head query heads shares one key/value
    head. n_kv_head = n_head is ordinary multi-head attention; the KV cache holds only the
    n_kv_head heads, so it shrinks by the group size."""

    def __init__(self, n_embd, n_head, n_kv_head=None, dropout=0.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head or n_head
        assert n_embd % n_head == 0, f"n_embd ({n_embd}) must be divisible by n_head ({n_head})"
        assert n_head % self.n_kv_head == 0, f"n_head ({n_head}) must be a multiple of n_kv_head"
        self.attn_dropout_p = dropout
        D = n_embd // n_head
        # q for every head, k and v for the n_kv_head heads only: C → (H + 2·Hkv)·D at once
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * self.n_kv_head) * D, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)      # a residual projection
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, rope, cache=None, layer=0):
        """x: (B, T, C) → (B, T, C). rope: (cos, sin) of x's positions, (T, D/2) each."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, C // self.n_head
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)                   # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)                 # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # positions enter here, q and k only
        if cache is not None:
            k, v = cache.append(layer, k, v)                     # (B, Hkv, T_cached + T, D)
        y = attend(q, k, v, self.attn_dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                   # merge heads
        return self.resid_dropout(self.c_proj(y))


def silu(x):
    """SiLU(x) = x·σ(x) (also "swish"): GELU's smooth cousin, with the logistic σ for Φ."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """W_down(SiLU(W_gate·x) ⊙ W_up·x) (Shazeer 2020): the gate, a function of the token itself,
    decides element by element how much of W_up·x passes on.

    Three matrices instead of two, so the hidden width shrinks from 4C to ~8C/3 to keep the
    parameters (and FLOPs) of GPT-2's MLP: 3 · C · 8C/3 = 2 · C · 4C. Rounded up to a multiple
    of 32, which matrix kernels like.
    """

    def __init__(self, n_embd, dropout=0.0):
        super().__init__()
        hidden = 32 * math.ceil(8 * n_embd / 3 / 32)
        self.gate = nn.Linear(n_embd, hidden, bias=False)        # W_gate
        self.up = nn.Linear(n_embd, hidden, bias=False)          # W_up
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)      # W_down, a residual projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):                                        # (B, T, C) → (B, T, C)
        h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden); F.silu = silu(), fused
        return self.dropout(self.c_proj(h))


class LlamaBlock(nn.Module):
    """x = x + attn(ln_1(x), rope);  x = x + mlp(ln_2(x)) — GPT-2's wiring, Llama's parts (the
    norms keep GPT-2's names, ln_1 and ln_2, though they are RMSNorms)."""

    def __init__(self, n_embd, n_head, n_kv_head=None, dropout=0.0):
        super().__init__()
        self.ln_1 = RMSNorm(n_embd)
        self.attn = GroupedQueryAttention(n_embd, n_head, n_kv_head, dropout=dropout)
        self.ln_2 = RMSNorm(n_embd)
        self.mlp = SwiGLU(n_embd, dropout=dropout)

    def forward(self, x, rope, cache=None, layer=0):            # (B, T, C) → (B, T, C)
        # rope: (cos, sin) of x's positions, (T, D/2) each: GPT computes them once for all blocks
        x = x + self.attn(self.ln_1(x), rope, cache=cache, layer=layer)
        x = x + self.mlp(self.ln_2(x))
        return x
