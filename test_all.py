"""The whole test suite: `pytest test_all.py`.

Each test states one behaviour in its name. Sections follow the reading order of the lessons:
attention → gpt → bpe → data → train → sample. Nothing here needs the network or
../shared/corpus; the tests build their own small data (and a local HTTP server for downloads).
"""
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
if (SHARED / "tiktoken_cache").is_dir():
    # tiktoken's official vocabulary files, so the suite runs offline.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

import pytest
import torch
import torch.nn.functional as F

from attention import Block, CausalSelfAttention, KVCache, LayerNorm, causal_mask, gelu, layer_norm
from attention import scaled_dot_product_attention
from gpt import GPT, PRESETS, GPTConfig


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
    rel_err = (ours - torch_out).norm() / torch_out.norm()
    assert rel_err < 1e-10


def test_causal_mask_lets_each_query_see_only_keys_up_to_its_own_position():
    assert torch.equal(causal_mask(3, 5), reference_causal_mask(3, 5))
    assert causal_mask(1, 6).all()                     # the newest token sees everything
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_attention_dropout_zeroes_weights_only_when_asked():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    same = scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    assert torch.equal(same, scaled_dot_product_attention(q, k, v, dropout_p=0.0))
    dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, same)


def copy_block(src, flash):
    twin = Block(src.ln_1.weight.numel(), src.attn.n_head, flash=flash)
    twin.load_state_dict(src.state_dict())
    return twin


def test_flash_and_written_out_blocks_give_the_same_output_in_float32():
    torch.manual_seed(0)
    block = Block(64, 4, flash=True).eval()
    written_out = copy_block(block, flash=False).eval()
    x = torch.randn(3, 20, 64)
    assert (block(x) - written_out(x)).abs().max() < 1e-5


def test_flash_and_written_out_agree_with_a_kv_cache_and_a_short_query_block():
    torch.manual_seed(1)
    block = Block(32, 2, flash=True).eval()
    written_out = copy_block(block, flash=False).eval()
    x = torch.randn(2, 10, 32)
    outs = []
    for b in (block, written_out):
        cache = KVCache(1)
        first = b(x[:, :6], cache=cache)
        rest = b(x[:, 6:], cache=cache)                  # 4 queries over 10 keys
        outs.append(torch.cat([first, rest], dim=1))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert (outs[0] - block(x)).abs().max() < 1e-5       # and both equal the uncached pass


def test_layer_norm_equals_torch_functional_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    expected = F.layer_norm(x, (32,), w, b, 1e-5)
    assert torch.allclose(layer_norm(x, w, b), expected, atol=1e-12)
    assert torch.allclose(layer_norm(x, w, None), F.layer_norm(x, (32,), w, None, 1e-5), atol=1e-12)
    module = LayerNorm(32, bias=True).double()
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    assert torch.allclose(module(x), layer_norm(x, w, b), atol=1e-12)
    assert LayerNorm(32, bias=False).bias is None


def test_gelu_equals_torch_tanh_gelu():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert torch.allclose(gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12)


def test_attention_rejects_a_width_not_divisible_by_heads():
    with pytest.raises(AssertionError, match="divisible"):
        CausalSelfAttention(10, 3)


# ==============================================================================================
# gpt.py
# ==============================================================================================

def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("gpt-nano", **{"vocab_size": 64, "block_size": 32, **overrides})
    return GPT(cfg)


def test_gpt2_small_has_exactly_124_439_808_parameters():
    with torch.device("meta"):                          # shapes only: no memory, no init time
        model = GPT(GPTConfig.from_preset("gpt2", vocab_size=50257, block_size=1024))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768


def test_presets_hold_the_documented_shapes():
    expected = {"gpt-nano": (3, 3, 48), "gpt-micro": (4, 4, 128), "gpt-mini": (6, 6, 192),
                "gpt-small": (8, 8, 512), "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    for name, (n_layer, n_head, n_embd) in expected.items():
        cfg = GPTConfig.from_preset(name, vocab_size=100)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
        assert cfg.n_embd % cfg.n_head == 0
    with pytest.raises(ValueError, match="gpt-nano"):
        GPTConfig.from_preset("gpt-huge")


def test_lm_head_is_tied_to_the_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight


def test_residual_projections_start_with_a_smaller_std():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=500, block_size=64))
    std_proj = model.blocks[0].mlp.c_proj.weight.std().item()
    std_fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001


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
    # Untrained: close to uniform guessing, ln(vocab).
    assert abs(loss.item() - math.log(64)) < 0.3


def test_forward_without_targets_returns_only_the_last_positions_logits():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (3, 12))
    last, loss = model(idx)
    full, _ = model(idx, torch.zeros_like(idx))
    assert loss is None and last.shape == (3, 1, 64)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_a_sequence_longer_than_block_size_is_refused_with_a_clear_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_cached_forward_gives_the_same_logits_as_a_full_recompute():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (2, 25))
    full, _ = model(idx, torch.zeros_like(idx))
    cache = KVCache(model.config.n_layer)
    model(idx[:, :10], cache=cache)
    for t in range(10, 25):
        step, _ = model(idx[:, t:t + 1], cache=cache)
        assert (step[:, 0] - full[:, t]).abs().max() < 1e-5


def test_kv_cache_gives_the_same_greedy_tokens_as_recompute_past_block_size():
    model = tiny_gpt(seed=3, block_size=16).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with_cache = model.generate(prompt, 40, temperature=0, use_cache=True)    # 45 > 16
    without = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)


def test_stream_yields_the_tokens_generate_returns():
    model = tiny_gpt().eval()
    prompt = torch.randint(0, 64, (1, 4))
    streamed = [int(t) for t in model.stream(prompt, 12, generator=torch.Generator().manual_seed(5))]
    full = model.generate(prompt, 12, generator=torch.Generator().manual_seed(5))
    assert streamed == full[0, 4:].tolist()


def controlled_logits():
    """Ten tokens with probabilities ∝ 0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.03, 0.02, 0.01, 0.01."""
    p = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.03, 0.02, 0.01, 0.01])
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])     # shuffle so ids ≠ ranks
    logits = torch.empty(10)
    logits[order] = p.log()
    return logits, order


def draw(logits, n, **kw):
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(n, -1)
    return GPT.sample_next(batch, generator=g, **kw)[:, 0]


def test_top_k_never_samples_outside_the_k_most_likely_tokens():
    logits, order = controlled_logits()
    ids = draw(logits, 4000, top_k=3)
    assert set(ids.tolist()) == set(order[:3].tolist())


def test_top_p_samples_only_the_smallest_set_reaching_p():
    logits, order = controlled_logits()
    ids = draw(logits, 4000, top_p=0.6)        # 0.30 + 0.25 = 0.55 < 0.6, so three tokens
    assert set(ids.tolist()) == set(order[:3].tolist())
    ids = draw(logits, 4000, top_p=0.5)        # 0.30 < 0.5 ≤ 0.55: two tokens
    assert set(ids.tolist()) == set(order[:2].tolist())
    ids = draw(logits, 100, top_p=0.1)         # even a tiny p keeps the most likely token
    assert set(ids.tolist()) == {int(order[0])}


def test_top_k_and_top_p_combine_and_temperature_zero_is_greedy():
    logits, order = controlled_logits()
    # top-p applies to the top-k tokens renormalised: 0.30/0.88 + 0.25/0.88 = 0.625 ≥ 0.6.
    assert set(draw(logits, 2000, top_k=5, top_p=0.6).tolist()) == set(order[:2].tolist())
    assert set(draw(logits, 2000, top_k=5, top_p=0.7).tolist()) == set(order[:3].tolist())
    assert set(draw(logits, 50, temperature=0).tolist()) == {int(order[0])}


def test_unrestricted_sampling_follows_the_distribution():
    logits, order = controlled_logits()
    ids = draw(logits, 20000)
    share = (ids == order[0]).float().mean().item()
    assert abs(share - 0.30) < 0.02


def test_the_same_seed_gives_the_same_sample():
    model = tiny_gpt().eval()
    prompt = torch.randint(0, 64, (2, 3))

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, generator=g)

    assert torch.equal(sample(42), sample(42))
    assert not torch.equal(sample(42), sample(43))


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


def test_flops_per_token_is_6n_plus_the_attention_term():
    model = tiny_gpt()
    cfg = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# ==============================================================================================
# project layout
# ==============================================================================================

@pytest.mark.skipif(not (SHARED / "tools" / "check_layout.py").exists(), reason="needs ../shared/tools")
def test_check_layout_reports_ok():
    out = subprocess.run([sys.executable, str(SHARED / "tools" / "check_layout.py"), str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "layout: ok" in out.stdout
