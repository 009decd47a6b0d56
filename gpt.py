"""Lesson 2 — GPT: a decoder-only language model built from attention Blocks.

What you will learn here, numbered as the section banners:
  1. the model's few hyper-parameters (GPTConfig) and the standard sizes (PRESETS), from a
     3-layer toy that trains in minutes on a laptop up to GPT-2 XL — with GPT-2's block or the
     modern (Llama-style) one;
  2. the GPT itself: token (+ position) embeddings → n_layer Blocks → a final norm → a
     language-model head that shares its matrix with the token embedding (weight tying); GPT-2's
     initialisation and why the residual projections start smaller; the loss, cross-entropy of
     the next token in nats per token;
  3. generation: temperature, top-k, top-p (nucleus) sampling, a repetition penalty, streamed
     one token at a time, with the KV cache from attention.py making each new token cheap;
  4. size and cost: counting parameters and FLOPs (for MFU, the share of the hardware's peak we
     use);
  5. a GPT rebuilt from a checkpoint's shape and weights, and given rows for new tokens (the
     chat template's, when chat-tuning); bits per byte, the loss that compares models with
     different tokenizers.
Optional sections: none — every line here is the lesson.

You need: attention.py (Block, LayerNorm, KVCache; LlamaBlock, RMSNorm, rope_tables).
Next lesson: bpe.py — how text becomes the integer token ids this model reads.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Block, KVCache, LayerNorm, LlamaBlock, RMSNorm, rope_tables


# ----------------------------------------------------------------------------------------------
# 1. Configuration and presets
# ----------------------------------------------------------------------------------------------

# name → depth and width. The gpt2* rows are OpenAI's GPT-2 family (Radford et al. 2019);
# the small ones are ours: nano, micro and mini train on a CPU in minutes (nano) to an hour
# (mini); gpt-small (30M parameters) wants a GPU.
PRESETS = {
    "gpt-nano":    dict(n_layer=3,  n_head=3,  n_embd=48),
    "gpt-micro":   dict(n_layer=4,  n_head=4,  n_embd=128),
    "gpt-mini":    dict(n_layer=6,  n_head=6,  n_embd=192),
    "gpt-small":   dict(n_layer=8,  n_head=8,  n_embd=512),
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),   # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    block_size: int = 256        # the context: the most tokens the model sees at once
    vocab_size: int = 50257      # how many different token ids exist (gpt2's tokenizer: 50257)
    n_layer: int = 4             # how many Blocks are stacked
    n_head: int = 4              # attention heads per Block
    n_embd: int = 128            # C: the width of every token's vector
    dropout: float = 0.0         # 0 for pre-training on plenty of data; 0.1–0.2 on small data
    bias: bool = True            # biases in Linear layers and LayerNorms (GPT-2's block only)
    block: str = "gpt2"          # "gpt2": GPT-2's block; "llama": RMSNorm, RoPE, SwiGLU, GQA
    n_kv_head: int = None        # the llama block's key/value heads (None: n_head, no grouping)

    @classmethod
    def from_preset(cls, name, **overrides):
        """GPTConfig.from_preset("gpt-micro", vocab_size=8192, block_size=256)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model type {name!r} — choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        """Plain dict of the fields (what a checkpoint stores as `model_config`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------
# 2. The model
# ----------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """idx (B, T) → wte (+ wpe) (B, T, C) → n_layer Blocks → ln_f → lm_head → logits (B, T, vocab).

    block="gpt2": learned positions added to the input, LayerNorm, GPT-2's Block. block="llama":
    no position table (the blocks rotate q and k instead), RMSNorm, attention.py's LlamaBlock.
    """

    @staticmethod
    def _init_weights(module):
        """GPT-2's init: weights N(0, 0.02), biases 0 (LayerNorms keep γ=1, β=0)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def __init__(self, config):
        super().__init__()
        assert config.block in ("gpt2", "llama"), f"block: gpt2 or llama, not {config.block!r}"
        self.config = config
        C = config.n_embd
        # Token embedding: row i is the vector that stands for token id i.
        self.wte = nn.Embedding(config.vocab_size, C)
        self.drop = nn.Dropout(config.dropout)
        if config.block == "gpt2":
            # Position embedding: attention itself is order-blind (a weighted *sum*), so each
            # position 0 … block_size−1 gets a learned vector added to its token's vector.
            self.wpe = nn.Embedding(config.block_size, C)
            self.blocks = nn.ModuleList(Block(C, config.n_head, dropout=config.dropout,
                                              bias=config.bias)
                                        for _ in range(config.n_layer))
            # pre-LN blocks leave the stream un-normalised
            self.ln_f = LayerNorm(C, bias=config.bias)
        else:
            # The rotations of every position, computed once and shared by all blocks; a buffer
            # (it moves with .to(device)) that is not saved: it follows from the config alone.
            cos, sin = rope_tables(C // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)    # (block_size, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.blocks = nn.ModuleList(LlamaBlock(C, config.n_head, config.n_kv_head,
                                                   dropout=config.dropout)
                                        for _ in range(config.n_layer))
            self.ln_f = RMSNorm(C)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer scores token i by a dot product with
        # the same vector that embeds token i. It saves vocab_size × C parameters — most of a
        # small model — and trains better, since rare tokens' rows get gradients from both ends.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 init: every Block adds two residual projections (attn.c_proj, mlp.c_proj) to the
        # stream, so its variance grows with each addition. Scaling those weights' std by
        # 1/√(2·n_layer) keeps the summed stream at a steady scale at the start of training.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def hidden_states(self, idx, cache=None):
        """idx: (B, T) token ids → the last layer's normalised vectors (B, T, C), before lm_head.

        cache: a KVCache; idx then holds only the new tokens, placed after the cached ones.
        """
        B, T = idx.shape
        start = cache.length() if cache is not None else 0       # absolute position of idx[:, 0]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}; crop it to the last "
                             f"{self.config.block_size}")
        x = self.wte(idx)                                        # (B, T, C)
        rope = None
        if self.config.block == "gpt2":
            # + (T, C) broadcast
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:                                    # the rotations of positions start … start + T − 1
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):                  # (B, T, C) → (B, T, C)
            if rope is None:                                     # GPT-2's: positions added above
                x = block(x, cache=cache, layer=i)
            else:                                                # Llama's: it rotates q and k
                x = block(x, rope, cache=cache, layer=i)
        return self.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids → (logits, loss).

        With targets (B, T): logits for every position (B, T, vocab) and the mean
        cross-entropy in nats/token; positions whose target is −1 are ignored.
        Without targets: only the last position's logits (B, 1, vocab) — all that predicting the
        next token needs, and it skips a (B, T, vocab) matmul that is the model's largest
        (stream() below goes further still: it scores with a transposed copy of the matrix).
        cache: as in hidden_states.
        """
        x = self.hidden_states(idx, cache)                       # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None              # (B, 1, vocab)
        logits = self.lm_head(x)                                 # (B, T, vocab)
        # Cross-entropy = −log p(correct next token), averaged: in nats (natural log) per token.
        # A model that guesses uniformly scores ln(vocab_size); perplexity is e^loss.
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------------------------
    # 3. Generation
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Pick the next token from last-position logits (B, vocab) → (B, 1).

        temperature: logits / t before the softmax. t < 1 sharpens the distribution, t > 1
          flattens it, t = 0 means greedy: always the most likely token.
        top_k: keep only the k most likely tokens.
        top_p: nucleus sampling — keep the smallest set of most-likely tokens whose total
          probability reaches p (so the set is small when the model is sure, large when not).
        generator: a seeded torch.Generator, for reproducible samples.
        """
        if (temperature < 0 or (top_k is not None and top_k < 1)
                or (top_p is not None and not 0 < top_p <= 1)):
            raise ValueError(f"need temperature ≥ 0, top_k ≥ 1, 0 < top_p ≤ 1 "
                             f"(got {temperature}, {top_k}, {top_p})")
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # Subtract the largest logit first: the softmax is unchanged, the best token's logit
        # becomes 0 and the rest ≤ 0. Then even a tiny temperature gives 0 and −∞ (probability 1
        # and 0: greedy, as it should be), never ∞ − ∞ = NaN. In float32 at least: float16 would
        # round every probability below 6e-8 to 0, and top_p's running sums coarsely. 1e-30: a
        # temperature float32 cannot hold (below ~1e-45) would round to 0, and 0 ÷ 0 is NaN.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, 1e-30)
        if top_k is not None and top_k < logits.size(-1):
            kth_best = torch.topk(logits, top_k, dim=-1).values[:, [-1]]    # (B, 1)
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Mass of all *more* likely tokens. A token stays if that is still < p, so the
            # most likely token always stays and the kept set is the smallest reaching p.
            mass_before = probs.cumsum(dim=-1) - probs
            drop_sorted = mass_before >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)   # back to vocabulary order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)

    @torch.inference_mode()        # like no_grad, and lighter still: no autograd bookkeeping at all
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               use_cache=True, generator=None, repetition_penalty=1.0):
        """Yield the new tokens one at a time, each a (B,) tensor (int(t) for B = 1).

        idx: (B, T) the prompt. Put the model in eval mode first (model.eval()), else dropout
        makes the output random. Stop early by simply leaving the loop (e.g. at <|endoftext|>).

        Without a cache every step runs the whole context through the model: the Linear layers
        cost O(T) per new token and attention O(T²). With the cache the prompt runs once
        ("prefill"); then each step feeds only the newest token: O(1) for the Linear layers and
        O(T) for its one query attending to the cached keys and values.

        repetition_penalty θ ≥ 1 makes every token this call has written (its last block_size)
        less likely (CTRL's penalty, Keskar et al. 2019, as transformers and llama.cpp apply it):
        its logit is divided by θ if positive, multiplied by θ if negative. Small models loop
        ("指为为为为…"); θ ≈ 1.1–1.3 breaks the loop without banning a repeated character
        outright. Only the new tokens count, not the prompt's: a chat prompt is full of
        <|im_end|>, which the answer must still be free to write.
        """
        block_size = self.config.block_size
        # Scoring a token reads the whole (vocab, C) output matrix, a decoding step's biggest read.
        # x @ a (C, vocab) copy adds up C long rows, reading the matrix once from start to end;
        # F.linear takes vocab short dot products instead: ~3× slower on a CPU core with the
        # matrix out of cache, as it is after a step through every layer (bench.py model); 1.3–2×
        # with it warm. The copy pays for itself within a few tokens.
        head = self.lm_head.weight.t().contiguous()              # (C, vocab)
        prompt_length = idx.size(1)
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                x = self.hidden_states(idx[:, -block_size:])
            elif cache is None or cache.length() >= block_size:
                # (Re)build the cache from the last block_size tokens. Once the text outgrows
                # the context, the window slides one token per step — and since position
                # embeddings are added at the input, every cached key/value was computed for
                # a position that has now shifted by one. A slid cache would be wrong, so we
                # recompute the window, exactly like the no-cache path. Rotary positions do not
                # rescue it: from the second layer on, a cached key was computed from a token
                # that had attended to tokens now out of the window.
                cache = KVCache(self.config.n_layer, block_size)
                x = self.hidden_states(idx[:, -block_size:], cache=cache)
            else:
                x = self.hidden_states(idx[:, -1:], cache=cache)   # only the newest token
            logits = x[:, -1, :] @ head                          # (B, C) @ (C, vocab) → (B, vocab)
            if repetition_penalty != 1.0 and idx.size(1) > prompt_length:
                seen = idx[:, prompt_length:][:, -block_size:]   # (B, n): the tokens written
                old = logits.gather(-1, seen)
                logits = logits.scatter(-1, seen, torch.where(old > 0, old / repetition_penalty,
                                                              old * repetition_penalty))
            next_id = self.sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id], dim=1)               # (B, T+1)
            yield next_id[:, 0]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None, repetition_penalty=1.0):
        """Like stream(), but return idx (B, T + max_new_tokens) with all new tokens appended."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                               generator, repetition_penalty))
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)

    # ------------------------------------------------------------------------------------------
    # 4. Size and cost
    # ------------------------------------------------------------------------------------------

    def num_params(self, non_embedding=True):
        """Number of parameters (the tied head counted once).

        non_embedding=True leaves out the position table (the llama block has none), which does no
        arithmetic. The token table stays in: through weight tying it is also the output layer's
        matrix, a real matmul.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.block == "gpt2":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """FLOPs to train on one token (forward + backward) at context T (default block_size).

        A weight used once per token costs a multiply and an add (2 FLOPs) in the forward
        pass, and twice that in the backward (gradients w.r.t. both its input and itself):
        6 FLOPs per parameter, so 6N. Attention's q·kᵀ and weights·v are matmuls with no
        parameters: per layer and token each costs 2·T·C forward, so 3 × 2 × 2·T·C = 12·T·C
        with the backward. Total: 6N + 12·n_layer·C·T (Chowdhery et al. 2022, PaLM, appendix B).
        The same for the llama block: its query heads still add up to C, grouped or not.
        """
        T = self.config.block_size if T is None else T
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------------------------------
    # 5. From a checkpoint, new tokens, and bits per byte
    # ------------------------------------------------------------------------------------------

    def grow_vocab(self, vocab_size):
        """Give the model rows for new token ids up to `vocab_size` (the chat template's two
        tokens, added to a vocabulary that lacked them: bpe.with_chat_tokens).

        Each new row starts as the mean of the old rows: as an input, a generic token rather
        than noise; as an output row (the head is tied to it), a logit close to the average
        token's, so the new token starts neither likely nor impossible, and tuning moves it from
        there. The old rows are kept as they are, so every old token's logit is unchanged.
        """
        old = self.wte.weight.data                               # (vocab, C)
        assert vocab_size > len(old), f"grow_vocab: {vocab_size} is not more than {len(old)}"
        new = old.mean(dim=0, keepdim=True).expand(vocab_size - len(old), -1)
        self.wte = nn.Embedding.from_pretrained(torch.cat([old, new]), freeze=False)
        self.lm_head.weight = self.wte.weight                    # tied, as before
        self.lm_head.out_features = self.config.vocab_size = vocab_size

    @classmethod
    def from_checkpoint(cls, ckpt, **changes):
        """A GPT of a checkpoint's shape (its model_config) holding its weights. `changes` replace
        config fields: train.py's --init_from sets the dropout, and may shrink block_size (the
        first rows of the position table are kept). Weights that do not fit: a ValueError."""
        try:                                      # (a field GPTConfig lacks: a TypeError)
            config = GPTConfig(**{**ckpt["model_config"], **changes})
            weights = dict(ckpt["model"])
            if "wpe.weight" in weights:
                weights["wpe.weight"] = weights["wpe.weight"][:config.block_size]
            model = cls(config)
            model.load_state_dict(weights)
        except (AssertionError, TypeError, RuntimeError, KeyError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"the weights do not fit its model_config ({first_line})") from None
        return model


def bits_per_byte(nats_per_token, tokens, n_bytes):
    """nats/token → bits/byte: × tokens (the text's total nats), ÷ ln 2 (nats → bits), ÷ the
    text's UTF-8 bytes. A property of the text, not of the tokens: models with different
    tokenizers compare fairly by it (train.py's evaluations, sample.py's --score)."""
    return nats_per_token * tokens / math.log(2) / n_bytes
