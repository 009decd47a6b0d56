"""The whole test suite: `pytest test_all.py`.

Each test states one behaviour in its name. Sections follow the reading order of the lessons:
attention → gpt → bpe → data → train → sample. Nothing here needs the network or
../shared/corpus; the tests build their own small data (and a local HTTP server for downloads).
"""
import contextlib
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

from attention import Block, CausalSelfAttention, KVCache, LayerNorm, causal_mask, gelu, gelu_tanh, layer_norm
from attention import scaled_dot_product_attention
from gpt import GPT, PRESETS, GPTConfig

# The models here are tiny: one thread is faster than two fighting over small matmuls, and it
# keeps the timings steady when the machine is busy.
torch.set_num_threads(1)


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
        cache = KVCache(1, 10)
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


def test_gelu_and_its_tanh_approximation_equal_torch_gelu():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert torch.allclose(gelu(x), F.gelu(x), atol=1e-12)
    assert torch.allclose(gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-12)
    assert (gelu(x) - gelu_tanh(x)).abs().max() < 1e-3


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
    cache = KVCache(model.config.n_layer, 32)
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


def test_greedy_generation_equals_argmax_of_forward_step_by_step():
    # stream() scores tokens with its own transposed copy of the output matrix; the reference
    # here is forward()'s lm_head on the whole (cropped) context, one token at a time. float64
    # keeps near-ties from flipping an argmax.
    model = tiny_gpt(seed=4, block_size=16).double().eval()
    idx = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(2))
    generated = model.generate(idx, 30, temperature=0)
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(idx[:, -16:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, idx)


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
# bpe.py
# ==============================================================================================
import random
import subprocess
import sys
import time
import unicodedata

import pytest
import tiktoken

import bpe

HERE = pathlib.Path(__file__).resolve().parent

# ---- test material, all built here (no corpus files needed) ---------------------------------

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


def mixed_text(n_bytes, seed=0):
    """Seeded Chinese/English text of at least n_bytes UTF-8 bytes."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.5:
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
    pieces = regex_findall(bpe.GPT4_SPLIT_PATTERN, "我们今天去北京，天气很好。")
    assert pieces == ["我们今天去北京", "，天气很好", "。"]
    assert regex_findall(bpe.GPT2_SPLIT_PATTERN, "我们今天去北京，天气很好。") == [
        "我们今天去北京", "，", "天气很好", "。"]


def regex_findall(pattern, text):
    import regex
    return regex.findall(pattern, text)


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
        assert tok.encode(text, allowed_special="all") == enc.encode(
            text, allowed_special="all"), text
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
    # a Han character cut in half decodes to U+FFFD with errors="replace", like tiktoken
    ids = enc.encode("智能")
    assert tok.decode(ids[:1]) == enc.decode(ids[:1])


def test_encode_matches_tiktoken_on_2000_random_unicode_strings(official):
    tok, enc = official
    for s in random_unicode_strings(2000, seed=1234):
        ids = tok.encode_ordinary(s)
        assert ids == enc.encode_ordinary(s), repr(s)
        assert tok.decode(ids) == s


def test_long_han_piece_encodes_fast_and_exactly(official):
    tok, enc = official
    rng = random.Random(7)
    piece = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(100_000))
    assert len(regex_findall(tok.pattern, piece)) == 1  # really one pre-token
    t0 = time.perf_counter()
    ids = tok.encode_ordinary(piece)
    seconds = time.perf_counter() - t0
    assert ids == enc.encode_ordinary(piece)
    assert seconds < 10, f"{seconds:.1f}s for 100,000 Han characters"


def test_long_runs_of_one_character_match_tiktoken(official):
    tok, enc = official
    for run in [" " * 20_000, "a" * 20_000, "ab" * 10_000, "7" * 20_000, "\n" * 20_000 + "x",
                "中" * 20_000, "😀" * 5_000]:
        assert tok.encode_ordinary(run) == enc.encode_ordinary(run), repr(run[:3])


def test_heap_merge_equals_simple_merge(official):
    tok, _ = official
    rng = random.Random(3)
    pieces = [mixed_text(rng.randint(1, 400), seed=k).encode("utf-8") for k in range(60)]
    pieces += [b"a" * 301, b"ab" * 200, "中文".encode() * 100]
    for piece in pieces:
        assert bpe.merge_piece_heap(piece, tok.ranks) == bpe.merge_piece_simple(piece, tok.ranks)


def test_merging_closed_segments_separately_changes_nothing(official):
    tok, _ = official
    texts = VARIED_TEXTS[12:23] + [mixed_text(5_000, seed=5)] + random_unicode_strings(300, seed=8)
    pieces = {p for t in texts for p in regex_findall(tok.pattern, t.replace("\ud800", ""))}
    for piece in pieces:
        assert tok._encode_new_piece(piece) == bpe.encode_piece(piece.encode(), tok.ranks), piece


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
    chunks = bpe.count_chunks(text, bpe.GPT4_SPLIT_PATTERN, ["<|endoftext|>"])
    naive_merges, naive_vocab = bpe.train_naive(chunks, 150)
    fast_merges, fast_vocab = bpe.train_fast(chunks, 150)
    assert len(fast_merges) >= 150
    assert fast_merges == naive_merges
    assert fast_vocab == naive_vocab


def test_trainers_agree_on_overlapping_and_repeated_pairs():
    # runs like "aaaa" and "ababab" are where counting overlapping pairs goes wrong
    text = "aaaa aaa aaaaaaa abababab ab ababa bbbb " * 30 + "中中中中中 文文文"
    chunks = bpe.count_chunks(text, bpe.GPT2_SPLIT_PATTERN)
    assert bpe.train_fast(chunks, 40) == bpe.train_naive(chunks, 40)


def test_ties_go_to_the_smallest_pair_ids():
    chunks = {b"ba": 1, b"ab": 1}  # (98, 97) and (97, 98) both occur once
    merges, _ = bpe.train_fast(chunks, 1)
    assert merges == [((97, 98), 256)]


def test_trained_vocab_size_counts_the_special_token(trained):
    tok, _ = trained
    assert tok.n_vocab == 400
    assert tok.eot_token == 399
    assert all(tok.ranks[bytes([b])] == b for b in range(256))  # ours: id = byte value


def test_train_rejects_a_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 257"):
        bpe.BPETokenizer.train("some text", 256)


def test_trained_vocab_gives_same_ids_through_tiktoken(trained):
    tok, path = trained
    enc = bpe.get_tokenizer(str(path))
    assert isinstance(enc, tiktoken.Encoding)
    texts = VARIED_TEXTS + [mixed_text(3_000, seed=9)] + random_unicode_strings(300, seed=5)
    for s in texts:
        ids = tok.encode_ordinary(s)
        assert ids == enc.encode_ordinary(s), repr(s)
        if "\ud800" not in s:
            assert tok.decode(ids) == s
    text = "one<|endoftext|>two"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_trained_vocab_compresses_its_training_text(trained):
    tok, _ = trained
    text = mixed_text(10_000, seed=1)
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


# ---- saving -----------------------------------------------------------------------------------

def test_save_writes_a_readable_file_and_load_restores_it(trained):
    tok, path = trained
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == "format: bpe-tokenizer-1"
    assert any(line.startswith("pattern: ") for line in lines[:8])
    assert "---" in lines
    assert len(lines) == lines.index("---") + 1 + len(tok.ranks)
    loaded = bpe.BPETokenizer.load(path)
    assert loaded.ranks == tok.ranks
    assert loaded.pattern == tok.pattern
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.name == tok.name


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return isinstance(obj, (str, int))


def test_tokenizer_dict_has_only_plain_types_and_round_trips(trained):
    tok, _ = trained
    d = bpe.tokenizer_to_dict(tok)
    assert _plain(d)
    back = bpe.tokenizer_from_dict(d)
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens
    enc = bpe.get_tokenizer(d)
    assert enc.encode_ordinary("我们 model") == tok.encode_ordinary("我们 model")
    assert bpe.get_tokenizer({"name": "gpt2"}).name == "gpt2"


def test_tokenizer_dict_loads_with_torch_weights_only(trained, tmp_path):
    torch = pytest.importorskip("torch")
    tok, _ = trained
    torch.save({"tokenizer": tok.to_dict()}, tmp_path / "ckpt.pt")
    d = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert bpe.BPETokenizer.from_dict(d).ranks == tok.ranks


def test_get_tokenizer_names_the_fix_for_an_unknown_name():
    with pytest.raises(ValueError, match="bpe.py train"):
        bpe.get_tokenizer("no_such_tokenizer")


# ---- command line -----------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "bpe.py"), *map(str, args)],
                          capture_output=True, text=True, env=os.environ.copy())


def test_cli_trains_and_reports(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text(mixed_text(20_000, seed=4), encoding="utf-8")
    out = tmp_path / "zh300.bpe"
    done = run_cli("train", corpus, "--vocab_size", 300, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "merge" in done.stderr  # progress
    assert bpe.BPETokenizer.load(out).n_vocab == 300
    done = run_cli("report", corpus, "--vocab", out)
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "| gpt2 |" in table and "| cl100k_base |" in table and "| zh300.bpe |" in table
    assert "chars/token" in table and "bytes/token" in table


@pytest.mark.parametrize("case", ["missing", "not_utf8", "small_vocab", "missing_vocab",
                                  "not_a_vocab"])
def test_cli_bad_input_gives_one_clear_line_and_exit_1(tmp_path, case):
    text_file = tmp_path / "ok.txt"
    text_file.write_text("hello 你好", encoding="utf-8")
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("你好世界".encode("gbk"))
    args = {
        "missing": ["train", tmp_path / "nope.txt", "--vocab_size", 300, "--out", tmp_path / "o"],
        "not_utf8": ["train", bad, "--vocab_size", 300, "--out", tmp_path / "o"],
        "small_vocab": ["train", text_file, "--vocab_size", 100, "--out", tmp_path / "o"],
        "missing_vocab": ["report", text_file, "--vocab", tmp_path / "nope.bpe"],
        "not_a_vocab": ["report", text_file, "--vocab", text_file],
    }[case]
    done = run_cli(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr


# ==============================================================================================
# data.py
# ==============================================================================================
import hashlib
import http.server
import json
import socket
import threading
import zipfile

import pytest
import tiktoken
import torch

import data

EOT = "<|endoftext|>"


# ---- a local HTTP server that misbehaves on request ---------------------------------------------

class _FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; server.mode picks the fault:
    "ok": honours Range; "cut": the first answer stops at 40 % and the connection closes;
    "ignore_range": like "cut", then answers 200 with the whole file even to a Range request;
    "500x2": the first two answers are 500."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
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
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
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
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultyHandler)
    httpd.files, httpd.mode, httpd.ranges = {}, "ok", []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(data, "BACKOFF_S", 0.01)


PAYLOAD = bytes(range(256)) * 1200  # 307,200 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---- download -----------------------------------------------------------------------------------

def test_download_resumes_a_cut_transfer_with_a_range_request(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "cut"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges[0] is None and len(server.ranges) == 2
    resumed_from = int(server.ranges[1].split("=")[1].rstrip("-"))
    assert resumed_from == server.cut_at  # asked for exactly the bytes that were missing
    assert not (tmp_path / "f.bin.part").exists()


def test_download_restarts_cleanly_when_server_ignores_range(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "ignore_range"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert server.ranges[1] is not None  # it asked to resume, got 200, and started over
    assert dest.read_bytes() == PAYLOAD


def test_download_succeeds_after_two_server_errors(server, tmp_path):
    server.files["/f.bin"], server.mode = PAYLOAD, "500x2"
    dest = data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and len(server.ranges) == 3


def test_download_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_download_404_fails_at_once_with_a_clear_error(server, tmp_path):
    with pytest.raises(data.DataError, match="404"):
        data.download(server.url + "/missing.json", tmp_path / "x.json")
    assert len(server.ranges) == 1  # no retries
    assert not (tmp_path / "x.json").exists()


def test_unreachable_host_says_how_to_train_offline(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(data.DataError, match=r"offline.*--dataset path/to/file\.txt"):
        data.download(f"http://127.0.0.1:{port}/x.json", tmp_path / "x.json", timeout=2)


# ---- built-in datasets, served locally ------------------------------------------------------------

ARTICLES = [f"第{i}篇文章\n人工智能（AI）是计算机科学的一个分支。\nLine {i} with \"quotes\" & emoji 🙂.\n"
            * (1 + i % 3) for i in range(40)]


def _decode(folder, split, name="gpt2"):
    return tiktoken.get_encoding(name).decode(data.load_tokens(folder, split).tolist())


def test_chinese_wikipedia_downloads_parses_and_tokenizes_end_to_end(server, tmp_path, monkeypatch):
    records = [{"completion": a, "source": "wikipedia.zh2307"} for a in ARTICLES]
    server.files["/wiki.json"] = json.dumps(records, ensure_ascii=False, indent=4).encode("utf-8")
    monkeypatch.setitem(data.DATASETS["chinese"], "url", server.url + "/wiki.json")
    monkeypatch.setattr(data, "JSON_BLOCK_CHARS", 700)  # force many refills of the sliding buffer
    folder = data.prepare("chinese", "gpt2", data_dir=tmp_path, num_proc=1, verbose=False)
    assert folder == tmp_path / "chinese" / "gpt2"
    assert (tmp_path / "raw" / "chinese" / "wikipedia-cn-20230720-filtered.json").is_file()
    train, val = _decode(folder, "train"), _decode(folder, "val")
    assert train + val == "".join(a + EOT for a in ARTICLES)
    n_val = val.count(EOT)
    assert 1 <= n_val <= 8 and val == "".join(a + EOT for a in ARTICLES[-n_val:])  # a tail


def test_wikitext_zip_is_read_per_article_from_its_own_splits(server, tmp_path, monkeypatch):
    train = " \n = Alpha = \n \n Alpha text .\n = = Section = = \n more .\n = Beta = \n Beta text .\n"
    valid = " \n = Gamma = \n Gamma text .\n"
    zip_path = tmp_path / "w.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", train)
        z.writestr("wikitext-2-raw/wiki.valid.raw", valid)
    server.files["/w.zip"] = zip_path.read_bytes()
    monkeypatch.setitem(data.DATASETS["wikitext2"], "url", server.url + "/w.zip")
    folder = data.prepare("wikitext2", "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert _decode(folder, "train") == (" \n = Alpha = \n \n Alpha text .\n = = Section = = \n more .\n"
                                        + EOT + " = Beta = \n Beta text .\n" + EOT)
    assert _decode(folder, "val") == valid + EOT


# ---- local text -> .bin ----------------------------------------------------------------------

TEXT = "".join(f"第{i}行：人工智能 is fun, isn't it?  \t{i * 7}\n" for i in range(300)) + "最后一行没有换行"


def test_folder_with_train_and_validation_decodes_to_the_exact_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(TEXT, encoding="utf-8")
    (corpus / "validation.txt").write_text("验证 text\n\nend", encoding="utf-8")
    folder = data.prepare(corpus, "gpt2", data_dir=tmp_path / "d", num_proc=2, verbose=False)
    assert folder == tmp_path / "d" / "corpus" / "gpt2"
    assert _decode(folder, "train") == TEXT + EOT
    assert _decode(folder, "val") == "验证 text\n\nend" + EOT
    meta = data.load_meta(folder)
    assert meta["dtype"] == "uint16" and data.load_tokens(folder, "train").dtype == torch.uint16
    assert (folder / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert meta["train_bytes"] == len(TEXT.encode("utf-8"))
    assert meta["val_bytes"] == len("验证 text\n\nend".encode("utf-8"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["sources"][0]["sha256"] == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


def test_single_txt_file_holds_out_its_last_tenth_at_a_line_break(tmp_path):
    path = tmp_path / "my_text.txt"
    path.write_text(TEXT, encoding="utf-8")
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert folder.parent.name == "my_text"
    train, val = _decode(folder, "train"), _decode(folder, "val")
    assert train.endswith("\n" + EOT) and train[:-len(EOT)] + val[:-len(EOT)] == TEXT
    assert 0.08 < len(val) / len(TEXT) < 0.12


def test_cl100k_base_files_are_uint32(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    folder = data.prepare(path, "cl100k_base", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    meta = data.load_meta(folder)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65536
    assert (folder / "val.bin").stat().st_size == 4 * meta["val_tokens"]
    assert _decode(folder, "train", "cl100k_base") + _decode(folder, "val", "cl100k_base") \
        == EOT.join(data._split_tail(TEXT)) + EOT


def test_second_prepare_does_no_tokenizing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    first = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    stamp = (first / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(data, "_tokenize", fail)
    assert data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1) == first
    assert "nothing to do" in capsys.readouterr().err
    assert (first / "train.bin").stat().st_mtime_ns == stamp


def test_one_and_two_workers_write_identical_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 300)  # many small tasks, long lines cut into pieces
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    one = data.prepare(path, "gpt2", data_dir=tmp_path / "a", num_proc=1, verbose=False)
    two = data.prepare(path, "gpt2", data_dir=tmp_path / "b", num_proc=2, verbose=False)
    for split in ("train", "val"):
        assert (one / f"{split}.bin").read_bytes() == (two / f"{split}.bin").read_bytes()
    assert _decode(two, "train") + _decode(two, "val") == EOT.join(data._split_tail(TEXT)) + EOT
    # cutting pieces after a line break keeps the tokens of the whole text
    enc = tiktoken.get_encoding("gpt2")
    whole = enc.encode_ordinary(data._split_tail(TEXT)[0]) + [enc.eot_token]
    assert data.load_tokens(two, "train").tolist() == whole


def test_jsonl_file_reads_text_or_completion_fields(tmp_path):
    docs = [f"文档 {i}\nbody {i}" for i in range(20)]
    lines = [json.dumps({"text" if i % 2 else "completion": d}, ensure_ascii=False) for i, d in enumerate(docs)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert _decode(folder, "train") + _decode(folder, "val") == "".join(d + EOT for d in docs)
    assert data.load_meta(folder)["val_docs"] >= 1


def test_max_mb_caps_the_text_tokenized(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 20, encoding="utf-8")  # ≈ 190 KB
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", max_mb=0.02, num_proc=1, verbose=False)
    meta = data.load_meta(folder)
    assert 0 < meta["train_bytes"] <= 20_000 and 0 < meta["val_bytes"] <= 2_000
    assert (TEXT * 20).startswith(_decode(folder, "train")[:-len(EOT)])


def test_bare_name_reads_your_own_data_from_data_raw(tmp_path):
    own = tmp_path / "d" / "raw" / "poems"
    own.mkdir(parents=True)
    (own / "train.txt").write_text(TEXT, encoding="utf-8")
    folder = data.prepare("poems", "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    assert folder == tmp_path / "d" / "poems" / "gpt2"
    assert _decode(folder, "train") + _decode(folder, "val") == EOT.join(data._split_tail(TEXT)) + EOT


def test_bpe_tokenizer_is_trained_once_saved_and_used(tmp_path, monkeypatch):
    import bpe
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    folder = data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=300, num_proc=1, verbose=False)
    assert folder.name == "bpe300" and (folder / "tokenizer.bpe").is_file()
    meta = data.load_meta(folder)
    enc = bpe.get_tokenizer(meta["tokenizer"])
    assert enc.n_vocab == meta["vocab_size"] and meta["dtype"] == "uint16"
    assert enc.decode(data.load_tokens(folder, "train").tolist()) == data._split_tail(TEXT)[0] + EOT

    def fail(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(bpe.BPETokenizer, "train", fail)
    (folder / "meta.json").unlink()  # force re-tokenizing: the saved tokenizer is reused
    assert data.prepare(path, "bpe", data_dir=tmp_path / "d", vocab_size=300, num_proc=1, verbose=False) == folder


# ---- bad input: one line that names the fix ----------------------------------------------------

def _run_cli(capsys, *args):
    code = data.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_empty_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, line = _run_cli(capsys, "--dataset", str(tmp_path / "empty.txt"), "--data_dir", str(tmp_path))
    assert code == 1 and line.startswith("error:") and "is empty" in line


def test_missing_path_is_a_one_line_error(tmp_path, capsys):
    code, line = _run_cli(capsys, "--dataset", str(tmp_path / "nope.txt"), "--data_dir", str(tmp_path))
    assert code == 1 and line.startswith("error: no such file or folder")


def test_non_utf8_file_is_a_one_line_error_naming_iconv(tmp_path, capsys):
    (tmp_path / "gbk.txt").write_bytes("中文文本\n".encode("gbk") * 10)
    code, line = _run_cli(capsys, "--dataset", str(tmp_path / "gbk.txt"), "--data_dir", str(tmp_path))
    assert code == 1 and "not UTF-8" in line and "iconv" in line


def test_unknown_dataset_name_lists_the_choices(tmp_path, capsys):
    code, line = _run_cli(capsys, "--dataset", "klingon", "--data_dir", str(tmp_path))
    assert code == 1 and "unknown dataset 'klingon'" in line and "shakespeare" in line
    assert issubclass(data.DataError, ValueError)


# ---- batches -----------------------------------------------------------------------------------

T, B = 8, 4


def _tokens(n_windows):
    return torch.arange(n_windows * T + 1, dtype=torch.int64).to(torch.uint16)  # id = position


def test_batches_are_next_token_windows_of_int64():
    x, y = data.BatchIterator(_tokens(40), T, B).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and (x[:, 0] % T == 0).all()


def test_epoch_visits_every_window_exactly_once():
    it = data.BatchIterator(_tokens(40), T, B, seed=3)
    assert it.windows_per_epoch == 40 and it.steps_per_epoch == 10
    starts = [s for _ in range(it.steps_per_epoch) for s in it.next_batch()[0][:, 0].tolist()]
    assert sorted(starts) == [k * T for k in range(40)]
    assert it.epoch == 1
    second = [s for _ in range(it.steps_per_epoch) for s in it.next_batch()[0][:, 0].tolist()]
    assert sorted(second) == sorted(starts) and second != starts  # a new permutation


def test_state_saved_mid_epoch_resumes_the_identical_sequence():
    it = data.BatchIterator(_tokens(42), T, B, seed=7)  # 2 leftover windows are dropped
    for _ in range(4):
        it.next_batch()
    state = it.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [it.next_batch()[0] for _ in range(15)]  # runs into the next epoch
    fresh = data.BatchIterator(_tokens(42), T, B, seed=7)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.next_batch()[0]) for a in expected)
    assert fresh.epoch == it.epoch


def test_ddp_ranks_see_disjoint_windows_and_take_the_same_number_of_steps():
    ranks = [data.BatchIterator(_tokens(41), T, B, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 5
    seen = [{s for _ in range(5) for s in it.next_batch()[0][:, 0].tolist()} for it in ranks]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_too_few_tokens_for_one_batch_is_a_clear_error():
    with pytest.raises(data.DataError, match="lower --batch_size"):
        data.BatchIterator(_tokens(3), T, B)


def test_get_batch_draws_reproducible_random_windows():
    tokens = _tokens(10)
    x1, y1 = data.get_batch(tokens, T, 16, torch.Generator().manual_seed(0))
    x2, _ = data.get_batch(tokens, T, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, x1 + 1)
    assert int(y1.max()) <= len(tokens) - 1


def test_load_tokens_maps_the_file_without_copying_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    folder = data.prepare(path, "gpt2", data_dir=tmp_path / "d", num_proc=1, verbose=False)
    tokens = data.load_tokens(folder, "train")
    it = data.BatchIterator(tokens, 16, 2)
    x, y = it.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 50257


# ==============================================================================================
# train.py
# ==============================================================================================

import json
import signal
import xml.etree.ElementTree as ET

import train

SMALL_TEXT = "\n\n".join(
    f"第{i}段：人工智能是计算机科学的一个分支，它试图理解智能的实质。"
    f"Paragraph {i}: a language model predicts the next token from the ones before it."
    for i in range(12)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small Chinese/English text file and a shared data folder (prepared once)."""
    root = tmp_path_factory.mktemp("corpus")
    path = root / "small.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path, root / "data"


def train_argv(corpus, out_dir, *extra):
    path, data_dir = corpus
    return ["--model_type", "gpt-nano", "--dataset", str(path), "--tokenizer", "bpe",
            "--vocab_size", "320", "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--block_size", "16",
            "--batch_size", "4", "--eval_iters", "2", "--eval_interval", "5", "--log_interval", "1",
            "--device", "cpu", "--num_proc", "1", "--seed", "7", "--lr", "3e-3", "--warmup_iters", "2", *extra]


def train_losses(out_dir):
    """(iteration, loss) of every logged training step, in order."""
    lines = (json.loads(line) for line in open(out_dir / "log.jsonl", encoding="utf-8"))
    return [(r["iter"], r["loss"]) for r in lines if r["type"] == "train"]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    args = train.parse_args(["--model_type", "gpt-nano", "--lr", "1e-3", "--min_lr", "1e-4", "--warmup_iters", "10"])
    lrs = [train.learning_rate(it, args, 110) for it in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)


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


def test_resume_continues_exactly_as_an_uninterrupted_run_across_an_epoch_boundary(corpus, tmp_path):
    common = ("--dropout", "0.1", "--lr_decay_iters", "40")
    straight = tmp_path / "straight"
    train.main(train_argv(corpus, straight, "--max_iters", "40", *common))
    halves = tmp_path / "halves"
    first = train.main(train_argv(corpus, halves, "--max_iters", "20", *common))
    assert first["iter_num"] == 20
    train.main(train_argv(corpus, halves, "--max_iters", "40", "--resume", *common))

    a, b = load_ckpt(straight / "last.pt"), load_ckpt(halves / "last.pt")
    assert a["epoch"] >= 1, "the run should cross an epoch boundary"
    assert train_losses(straight) == train_losses(halves)          # every step's loss, bit for bit
    assert a["iter_num"] == b["iter_num"] == 40
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_checkpoints_load_with_weights_only_and_logs_are_valid(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_argv(corpus, out, "--max_iters", "6"))
    for name in ("last.pt", "best_model.pt"):
        ckpt = load_ckpt(out / name)
        for key in ("model", "model_config", "tokenizer", "optimizer", "scaler", "iter_num", "epoch",
                    "best_val_loss", "train_args", "rng", "data_state"):
            assert key in ckpt, key
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        # our own BPE travels inside the checkpoint: it rebuilds without the data folder
        enc = train.bpe.get_tokenizer(ckpt["tokenizer"])
        assert enc.n_vocab == 320 == ckpt["model_config"]["vocab_size"]
        assert enc.decode(enc.encode("人工智能 model")) == "人工智能 model"
    records = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    assert {r["type"] for r in records} == {"train", "eval"}
    evals = [r for r in records if r["type"] == "eval"]
    assert evals[-1]["val_bpb"] == pytest.approx(
        evals[-1]["val_loss"] * train.data.load_meta(next((corpus[1]).glob("*/bpe320")))["val_tokens"]
        / train.data.load_meta(next((corpus[1]).glob("*/bpe320")))["val_bytes"] / math.log(2))
    root = ET.parse(out / "loss.svg").getroot()
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_a_fresh_run_refuses_to_overwrite_an_earlier_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_argv(corpus, out, "--max_iters", "2"))
    before = (out / "best_model.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(corpus, out, "--max_iters", "4"))
    assert exit_info.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error:") and "--resume" in last_line
    assert (out / "best_model.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_model(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_argv(corpus, out, "--max_iters", "2"))
    argv = train_argv(corpus, out, "--max_iters", "4", "--resume")
    argv[argv.index("gpt-nano")] = "gpt-micro"
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error:") and "--model_type gpt-nano" in last_line


def test_a_nan_loss_stops_training_with_a_clear_error_and_keeps_the_checkpoints(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train.main(train_argv(corpus, out, "--max_iters", "4"))
    before = load_ckpt(out / "last.pt")
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward_that_goes_nan(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 1:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_that_goes_nan)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(corpus, out, "--max_iters", "12", "--resume"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: loss is nan" in err and "--lr" in err
    after = load_ckpt(out / "last.pt")
    assert after["iter_num"] == before["iter_num"] == 4
    assert all(torch.isfinite(t).all() for t in after["model"].values())
    load_ckpt(out / "best_model.pt")


def test_float16_autocast_with_grad_scaler_trains_on_cpu(corpus, tmp_path):
    out = tmp_path / "fp16"
    train.main(train_argv(corpus, out, "--max_iters", "6", "--dtype", "float16"))
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert all(math.isfinite(loss) for _, loss in train_losses(out))


def subprocess_env():
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    return env


def test_sigterm_saves_a_last_checkpoint_that_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(corpus, out, "--max_iters", "100000", "--eval_interval", "100000")
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *argv], cwd=ROOT, env=subprocess_env(),
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
    assert "--resume" in output and "Resume with" in output
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["iter_num"] >= 3
    result = train.main(train_argv(corpus, out, "--max_iters", str(ckpt["iter_num"] + 2), "--resume"))
    assert result["iter_num"] == ckpt["iter_num"] + 2


def test_torchrun_with_two_processes_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    single = tmp_path / "single"
    train.main(train_argv(corpus, single, "--max_iters", "4", "--batch_size", "8"))
    ddp_out = tmp_path / "ddp"
    argv = train_argv(corpus, ddp_out, "--max_iters", "4", "--batch_size", "4")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *argv], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, encoding="utf-8", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for (i, loss_one), (j, loss_two) in zip(train_losses(single), train_losses(ddp_out), strict=True):
        assert i == j and abs(loss_one - loss_two) < 1e-5      # the mean over the same 8 sequences
    a, b = load_ckpt(single / "last.pt")["model"], load_ckpt(ddp_out / "last.pt")["model"]
    for key in a:
        # Adam divides by √v: where a gradient is ≈ 0, float-rounding differences of the
        # all-reduce can move a weight by up to ~lr, so compare at that scale.
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_sample_py_continues_a_chinese_prompt_from_a_checkpoint_train_py_wrote(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_argv(corpus, out, "--max_iters", "30"))           # our own BPE, inside the checkpoint
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(out / "best_model.pt"),
                           "--prompt", "人工智能", "--max_new_tokens", "20", "--seed", "1", "--device", "cpu"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, timeout=120)
    text = proc.stdout.decode("utf-8")
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert text.startswith("人工智能") and len(text) > len("人工智能")


# ==============================================================================================
# sample.py
# ==============================================================================================
import contextlib
import io
import math
import subprocess
import sys
import time

import pytest
import torch

import sample
from bpe import BPETokenizer, get_tokenizer
from gpt import GPT, GPTConfig

_ROOT = pathlib.Path(__file__).resolve().parent

# A small Chinese text of our own, with emoji, for the tiny models below.
ZH_TEXT = (
    "人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。"
    "语言模型读入一段文字，然后预测下一个字。😀 模型越大，读过的文字越多，预测就越准确。"
    "今天天气很好，我们去公园散步，看见鹦鹉在树上说你好。🦜 小朋友们都笑了。"
    "学习需要耐心：先读懂每一行代码，再动手训练一个小模型，最后用它来写诗。🌏\n"
) * 4

# Han characters and emoji that byte-level vocabularies split across tokens:
# cl100k_base cuts 智 in two, gpt2 cuts nearly every character, both cut the emoji.
SPLIT_TEXT = "人工智能很有趣😀，鹦鹉🦜说：你好，世界🌏！"


def _env():
    """The subprocess environment: offline tiktoken files, one thread, a console that is NOT UTF-8."""
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "ascii"
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextlib.contextmanager
def _one_thread():
    """Tiny models run fastest on one thread: with more, each small op pays for thread wake-ups,
    many times over when other processes hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    with _one_thread():
        yield


def _train_tiny_checkpoint(path, enc, tokenizer_entry, tokenizer_arg, steps=8, block_size=32):
    """A gpt-nano trained a few AdamW steps on ZH_TEXT, saved with every checkpoint key."""
    with _one_thread():
        return _train_and_save(path, enc, tokenizer_entry, tokenizer_arg, steps, block_size)


def _train_and_save(path, enc, tokenizer_entry, tokenizer_arg, steps, block_size):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt-nano", vocab_size=enc.n_vocab, block_size=block_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(enc.encode_ordinary(ZH_TEXT), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block_size - 1, (8,), generator=g)
        x = torch.stack([data[s:s + block_size] for s in starts])
        y = torch.stack([data[s + 1:s + block_size + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.save({
        "model": model.state_dict(), "model_config": config.to_dict(), "tokenizer": tokenizer_entry,
        "optimizer": optimizer.state_dict(), "scaler": None, "iter_num": steps, "epoch": 0,
        "best_val_loss": loss.item(), "rng": None, "data_state": {"epoch": 0, "position": 0},
        "train_args": {"model_type": "gpt-nano", "tokenizer": tokenizer_arg, "dataset": "tiny-zh"},
    }, path)
    return path


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_gpt2") / "best_model.pt"
    return _train_tiny_checkpoint(path, get_tokenizer("gpt2"), {"name": "gpt2"}, "gpt2", steps=3)


@pytest.fixture(scope="module")
def own_bpe():
    return BPETokenizer.train(ZH_TEXT, 320, name="zh320")


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, own_bpe):
    path = tmp_path_factory.mktemp("ckpt_bpe") / "best_model.pt"
    entry = own_bpe.to_dict()
    return _train_tiny_checkpoint(path, get_tokenizer(entry), entry, "bpe")


def _run_main(capsys, argv):
    rc = sample.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- streaming without "�" ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_streamed_text_has_no_replacement_char_and_equals_decoding_all_tokens(name):
    enc = get_tokenizer(name)
    ids = enc.encode(SPLIT_TEXT)
    # The premise: some tokens are not whole characters, so token-by-token decoding breaks them.
    assert "\ufffd" in "".join(enc.decode([t]) for t in ids)
    pieces = list(sample.decode_stream(enc, iter(ids)))
    streamed = "".join(pieces)
    assert "\ufffd" not in streamed
    assert streamed == enc.decode(ids) == SPLIT_TEXT
    assert len(pieces) > 1                      # it really streamed, piece by piece


def test_a_character_split_across_tokens_appears_only_when_complete():
    enc = get_tokenizer("cl100k_base")
    ids = enc.encode("智")                      # E6 99 | BA: two tokens, one character
    assert len(ids) == 2
    assert list(sample.decode_stream(enc, iter(ids))) == ["智"]


def test_a_sample_that_stops_mid_character_ends_with_one_replacement_char():
    enc = get_tokenizer("cl100k_base")
    ids = enc.encode("人工智")[:-1]             # the last byte of 智 never arrives
    assert "".join(sample.decode_stream(enc, ids)) == "人工\ufffd" == enc.decode(ids)


def test_token_ids_beyond_the_tokenizer_decode_to_nothing():
    enc = get_tokenizer("gpt2")                 # a model's vocab may be padded to 50304
    assert "".join(sample.decode_stream(enc, [enc.encode("你")[0], 50300, enc.encode("你")[1]])) == "你"


class _ScriptedModel(torch.nn.Module):
    """Stands in for a GPT: stream() yields a fixed list of token ids."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def stream(self, idx, max_new_tokens, *args, **kwargs):
        for t in self.ids[:max_new_tokens]:
            yield torch.tensor([t])


def test_generation_stops_at_the_end_of_text_token():
    enc = get_tokenizer("gpt2")
    ids = enc.encode("你好") + [enc.eot_token] + enc.encode("再见")
    text = "".join(sample.stream_text(_ScriptedModel(ids), enc, [enc.eot_token], max_new_tokens=50))
    assert text == "你好"


# ---- prompts -----------------------------------------------------------------------------------

def test_empty_prompt_starts_from_the_end_of_text_token():
    enc = get_tokenizer("gpt2")
    assert sample.encode_prompt(enc, "", block_size=32) == [enc.eot_token]


def test_prompt_longer_than_the_context_keeps_its_last_block_size_tokens_with_a_note(capsys):
    enc = get_tokenizer("gpt2")
    prompt = "人工智能" * 20
    ids = sample.encode_prompt(enc, prompt, block_size=32)
    assert ids == enc.encode(prompt)[-32:]
    assert "note:" in capsys.readouterr().err


# ---- end to end --------------------------------------------------------------------------------

def test_sample_cli_continues_the_prompt_in_utf8_even_on_an_ascii_console(gpt2_checkpoint):
    result = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(gpt2_checkpoint), "--prompt", "人工智能",
         "--max_new_tokens", "20", "--device", "cpu"],
        cwd=_ROOT, env=_env(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout.decode("utf-8").startswith("人工智能")


def test_sample_cli_works_with_our_own_bpe_carried_inside_the_checkpoint(bpe_checkpoint):
    result = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(bpe_checkpoint), "--prompt", "人工智能",
         "--max_new_tokens", "20", "--num_samples", "2", "--no_stream"],
        cwd=_ROOT, env=_env(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = result.stdout.decode("utf-8")
    assert out.startswith("人工智能") and out.count("人工智能") >= 2


def test_the_checkpoint_rebuilds_our_own_bpe_with_the_same_ids(bpe_checkpoint, own_bpe):
    model, enc, ckpt = sample.load_checkpoint(bpe_checkpoint)
    assert enc.encode(SPLIT_TEXT) == own_bpe.encode(SPLIT_TEXT)
    assert model.config.vocab_size == own_bpe.n_vocab and not model.training


# ---- reproducibility and the KV cache ----------------------------------------------------------

def test_the_same_seed_gives_the_same_samples(capsys, one_thread, bpe_checkpoint):
    argv = ["--checkpoint", str(bpe_checkpoint), "--prompt", "今天", "--num_samples", "2",
            "--max_new_tokens", "30", "--temperature", "1.0", "--top_k", "50", "--top_p", "0.95"]
    first = _run_main(capsys, argv + ["--seed", "7"])
    again = _run_main(capsys, argv + ["--seed", "7"])
    other = _run_main(capsys, argv + ["--seed", "8"])
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1]
    assert first[1] != other[1]


def test_no_stream_prints_the_same_text_as_streaming(capsys, one_thread, bpe_checkpoint):
    argv = ["--checkpoint", str(bpe_checkpoint), "--prompt", "今天", "--max_new_tokens", "30"]
    assert _run_main(capsys, argv)[1] == _run_main(capsys, argv + ["--no_stream"])[1]


def test_greedy_output_is_the_same_with_and_without_the_kv_cache(one_thread, bpe_checkpoint):
    model, enc, _ = sample.load_checkpoint(bpe_checkpoint)
    ids = sample.encode_prompt(enc, "人工智能", model.config.block_size)
    # 60 new tokens > block_size 32: the window also slides past the context.
    runs = [list(sample.stream_text(model, enc, ids, 60, temperature=0, use_cache=c, stop_at_eot=False))
            for c in (True, False)]
    assert "".join(runs[0]) == "".join(runs[1])


def test_the_no_cache_flag_gives_the_same_greedy_text(capsys, one_thread, bpe_checkpoint):
    argv = ["--checkpoint", str(bpe_checkpoint), "--prompt", "人工智能", "--max_new_tokens", "40",
            "--temperature", "0"]
    cached, recomputed = _run_main(capsys, argv), _run_main(capsys, argv + ["--no_cache"])
    assert cached[0] == recomputed[0] == 0 and cached[1] == recomputed[1]


# ---- scoring -----------------------------------------------------------------------------------

def _random_model(vocab_size, block_size):
    torch.manual_seed(1)
    return GPT(GPTConfig.from_preset("gpt-nano", vocab_size=vocab_size, block_size=block_size)).eval()


def test_score_equals_the_direct_loss_when_the_text_fits_the_context(one_thread, own_bpe):
    enc = get_tokenizer(own_bpe.to_dict())
    text = "人工智能是计算机科学的一个分支。"
    tokens = enc.encode_ordinary(text)
    model = _random_model(enc.n_vocab, block_size=len(tokens) + 4)
    x = torch.tensor([[enc.eot_token] + tokens[:-1]])
    y = torch.tensor([tokens])
    with torch.no_grad():
        _, direct = model(x, y)
    result = sample.score_text(model, enc, text)
    assert result["tokens"] == len(tokens) and result["bytes"] == len(text.encode("utf-8"))
    assert result["nats_per_token"] == pytest.approx(direct.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(direct.item()), rel=1e-5)


def test_score_over_sliding_windows_scores_each_token_once_with_its_window_context(one_thread, own_bpe):
    enc = get_tokenizer(own_bpe.to_dict())
    text = ZH_TEXT[:150]
    T, stride = 16, 8
    model = _random_model(enc.n_vocab, block_size=T)
    seq = [enc.eot_token] + enc.encode_ordinary(text)
    assert len(seq) > 3 * T
    # Reference, one token at a time: window k holds inputs seq[k·s : k·s+T] and predicts
    # targets k·s+1 … k·s+T; target t belongs to the first window that reaches it.
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            begin = max(0, math.ceil((t - T) / stride)) * stride
            logits, _ = model(torch.tensor([seq[begin:t]]), torch.tensor([seq[begin + 1:t + 1]]))
            total -= torch.log_softmax(logits[0, -1], dim=-1)[seq[t]].item()
    result = sample.score_text(model, enc, text, stride=stride)
    assert result["tokens"] == len(seq) - 1
    assert result["nats_per_token"] * result["tokens"] == pytest.approx(total, rel=1e-5)
    # The default stride is block_size // 2.
    assert sample.score_text(model, enc, text) == result


def test_bits_per_byte_is_total_nats_over_ln2_over_utf8_bytes(one_thread, own_bpe):
    enc = get_tokenizer(own_bpe.to_dict())
    text = ZH_TEXT[:100]
    result = sample.score_text(_random_model(enc.n_vocab, block_size=16), enc, text)
    total_nats = result["nats_per_token"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(total_nats / math.log(2) / len(text.encode("utf-8")))


def test_score_cli_prints_loss_perplexity_and_bits_per_byte(capsys, one_thread, tmp_path, bpe_checkpoint):
    text_file = tmp_path / "text.txt"
    text_file.write_text(ZH_TEXT[:200], encoding="utf-8")
    rc, out, err = _run_main(capsys, ["--checkpoint", str(bpe_checkpoint), "--score", str(text_file)])
    assert rc == 0, err
    model, enc, _ = sample.load_checkpoint(bpe_checkpoint)
    expected = sample.score_text(model, enc, ZH_TEXT[:200])
    assert f"{expected['nats_per_token']:.4f} nats/token" in out
    assert f"perplexity:    {expected['perplexity']:.2f}" in out
    assert f"bits per byte: {expected['bits_per_byte']:.4f}" in out


# ---- checkpoints, flags and errors -------------------------------------------------------------

def test_default_checkpoint_is_the_newest_best_model(tmp_path):
    for i, run in enumerate(["gpt-micro", "gpt-nano"]):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "best_model.pt"
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    assert sample.newest_checkpoint(tmp_path) == tmp_path / "gpt-nano" / "best_model.pt"


def test_flags_that_agree_with_the_checkpoint_are_accepted(capsys, one_thread, gpt2_checkpoint):
    argv = ["--checkpoint", str(gpt2_checkpoint), "--max_new_tokens", "3",
            "--tokenizer", "gpt2", "--model_type", "gpt-nano"]
    assert _run_main(capsys, argv)[0] == 0


@pytest.mark.parametrize("flag,value,held", [("--tokenizer", "cl100k_base", "gpt2"),
                                             ("--model_type", "gpt-mini", "gpt-nano")])
def test_flags_that_disagree_with_the_checkpoint_say_what_it_holds(capsys, gpt2_checkpoint, flag, value, held):
    rc, out, err = _run_main(capsys, ["--checkpoint", str(gpt2_checkpoint), flag, value])
    assert rc == 1 and out == ""
    assert err.startswith(f"error: {flag} {value} does not match") and held in err


def _bad_file(tmp_path, kind, gpt2_checkpoint):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = gpt2_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path


@pytest.mark.parametrize("kind,says", [
    ("missing", "train one with: python train.py --model_type gpt-micro --dataset chinese"),
    ("truncated", "truncated"),
    ("text", "not a PyTorch checkpoint"),
    ("tensor", "not a checkpoint of this project"),
])
def test_a_bad_checkpoint_is_one_clear_error_line(capsys, tmp_path, gpt2_checkpoint, kind, says):
    path = _bad_file(tmp_path, kind, gpt2_checkpoint)
    rc, out, err = _run_main(capsys, ["--checkpoint", str(path)])
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


@pytest.mark.parametrize("content,says", [(b"", "is empty"), (b" \n", "is empty"),
                                          ("人工智能".encode("gbk"), "not UTF-8")])
def test_a_score_file_that_is_empty_or_not_utf8_is_one_clear_error_line(capsys, tmp_path, gpt2_checkpoint,
                                                                          content, says):
    text_file = tmp_path / "text.txt"
    text_file.write_bytes(content)
    rc, out, err = _run_main(capsys, ["--checkpoint", str(gpt2_checkpoint), "--score", str(text_file)])
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


@pytest.mark.parametrize("device,says", [("gpu", "not a device"), ("xla", "runs on cpu, cuda or mps"),
                                         (f"cuda:{torch.cuda.device_count()}", "CUDA GPU(s) here")])
def test_a_device_that_is_not_here_is_one_clear_error_line(capsys, gpt2_checkpoint, device, says):
    rc, out, err = _run_main(capsys, ["--checkpoint", str(gpt2_checkpoint), "--device", device])
    assert rc == 1 and out == ""
    assert err.startswith(f"error: --device {device}: ") and says in err and err.count("\n") == 1


def test_with_no_checkpoint_flag_and_none_trained_the_error_says_how_to_train_one(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run_main(capsys, ["--prompt", "人工智能"])
    assert rc == 1 and out == ""
    assert err == f"error: no checkpoint found under checkpoints/ — train one with: {sample.TRAIN_HINT}\n"


# ---- interactive -------------------------------------------------------------------------------

@pytest.mark.parametrize("typed", ["人工智能\n今天\nexit\n", "人工智能\n今天\n"])   # `exit`, or Ctrl-D
def test_interactive_mode_answers_each_prompt_until_exit_or_end_of_input(capsys, one_thread, monkeypatch,
                                                                         bpe_checkpoint, typed):
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    rc, out, err = _run_main(capsys, ["--checkpoint", str(bpe_checkpoint), "--interactive",
                                      "--max_new_tokens", "10"])
    assert rc == 0, err
    assert ">>> 人工智能" in out and ">>> 今天" in out and out.count(">>> ") == 3


# ==============================================================================================
# project layout
# ==============================================================================================

@pytest.mark.skipif(not (SHARED / "tools" / "check_layout.py").exists(), reason="needs ../shared/tools")
def test_check_layout_reports_ok():
    out = subprocess.run([sys.executable, str(SHARED / "tools" / "check_layout.py"), str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "layout: ok" in out.stdout
