"""Lesson 1 — attention: the one idea a transformer is built on.

What you will learn here, numbered as the section banners:
  1. scaled dot-product attention written out as the formula softmax(q·kᵀ/√d + mask)·v,
     with the causal mask (and the offset it needs once a KV cache is in play);
  2. LayerNorm and GELU written out, so nothing in the model is a black box (the modules
     then call torch's fused versions of the very same formulas, which the tests compare);
  3. the MLP (feed-forward) sub-layer;
  4. multi-head causal self-attention: one fused q/k/v projection, splitting into heads,
     merging back, and a KV cache that makes generation fast;
  5. the transformer Block: pre-LayerNorm residual wiring of the two sub-layers.
Optional sections: none — every line here is the lesson.

You need: Python and a little PyTorch (tensors, nn.Module). Nothing of ours comes before this.
Next lesson: gpt.py stacks these Blocks into a whole language model.

Shape legend used in comments: B batch, T time (sequence length), C channels (n_embd),
H heads, D = C / H the width of one head.
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
        scores = scores.masked_fill(~allowed, float("-inf"))     # e^(−∞) = 0: no weight on the future
    # bfloat16/float16 scores are exponentiated and summed in (at least) float32: with 8 or 11
    # bits of mantissa, a sum of many small probabilities would drift. float64 stays float64.
    weights = softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # rows sum to 1
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
    var = x.var(dim=-1, keepdim=True, unbiased=False)            # population variance (÷C, not ÷(C−1))
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


class LayerNorm(nn.Module):
    """LayerNorm with learnable γ (weight) and optional β (bias); `bias=False` drops β.

    forward() calls torch's fused F.layer_norm: exactly layer_norm() above (the tests check),
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
    a CPU (about 2× here), and the two differ by < 0.001, so our MLP uses the exact form.
    OpenAI's GPT-2 weights were trained with this form; loading them would call for it.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# ----------------------------------------------------------------------------------------------
# 3. The MLP: where each token "thinks" on its own
# ----------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear C → 4C, GELU, Linear 4C → C, dropout. Applied to every position independently.

    Attention moves information *between* tokens; the MLP transforms it *within* a token.
    The 4× hidden width is GPT-2's choice (Radford et al. 2019).
    """

    def __init__(self, n_embd, dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # a residual projection (see gpt.py init)
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
        self.keys = [None] * n_layer                             # each (B, H, max_len, D) once used
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and the tokens before it.

    H heads of width D = C / H run side by side, each free to attend to different things
    (one to the previous word, one to the subject of the sentence, …); their outputs are
    concatenated back to width C and mixed by an output projection.
    """

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, flash=True):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd ({n_embd}) must be divisible by n_head ({n_head})"
        self.n_head = n_head
        self.attn_dropout_p = dropout                            # a rate, applied to the weights
        self.flash = flash                                       # True: torch's fused kernel
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
        p = self.attn_dropout_p if self.training else 0.0
        Tq, Tk = q.size(2), k.size(2)
        # torch's fused CPU kernel is slow in bfloat16 (torch 2.13; gpt-micro, block 64, forward +
        # backward: 35 ms/iter fused, 26 ms written out), so a CPU in bfloat16 takes ours. At
        # generation time (one query row) the two cost about the same, so the rule stays simple.
        fused = self.flash and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
        if fused:
            # Same math as our function, fused into one kernel that never materialises the
            # (Tq, Tk) score matrix (FlashAttention on CUDA). Its is_causal flag assumes
            # Tq == Tk; for a cached block (Tq < Tk) we pass our offset mask instead.
            if Tq == Tk or Tq == 1:
                # Tq == 1: the single newest query may see every key, so no mask at all.
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=(Tq == Tk and Tq > 1))
            else:
                mask = causal_mask(Tq, Tk, device=x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)                   # (B, H, T, D) → (B, T, H·D): merge heads
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

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, flash=True):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout, bias=bias, flash=flash)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x, cache=None, layer=0):                   # (B, T, C) → (B, T, C)
        x = x + self.attn(self.ln_1(x), cache=cache, layer=layer)
        x = x + self.mlp(self.ln_2(x))
        return x
