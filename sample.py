"""Lesson 6 — sampling: turning a checkpoint back into text, and scoring text with it.

This is the last lesson. What you will learn here, top to bottom:
  1. loading a checkpoint safely (`torch.load(weights_only=True)`: no pickled code runs), and
     rebuilding both the model and its tokenizer from it — a checkpoint is self-contained;
  2. why decoding a byte-level BPE model one token at a time prints "�" for Chinese and emoji,
     and how an incremental UTF-8 decoder fixes it: a character split across tokens is held
     back until its last byte arrives, then printed whole;
  3. streaming generation (temperature, top-k, top-p, a seed, the KV cache), stopping at
     <|endoftext|>, and what to do with an empty prompt or one longer than the context;
  4. scoring: the model's loss on any text over sliding windows, as nats/token, perplexity and
     bits per byte — the one number that compares models with *different* tokenizers fairly;
  5. the command line, including an interactive prompt loop.

You need: gpt.py (GPT, GPTConfig, GPT.stream) and bpe.py (get_tokenizer: our own BPE and
OpenAI's vocabularies as a tiktoken.Encoding). train.py wrote the checkpoints this file reads.

    python sample.py --prompt "人工智能"                      # newest checkpoints/*/best_model.pt
    python sample.py --checkpoint checkpoints/gpt-micro/best_model.pt --num_samples 3 --seed 7
    python sample.py --interactive --temperature 0.8 --top_p 0.95
    python sample.py --score ../shared/corpus/zh_wiki_sentences_cc0.txt
"""
import argparse
import codecs
import math
import pathlib
import sys

import torch

from bpe import get_tokenizer
from gpt import GPT, PRESETS, GPTConfig, strip_wrapper_prefixes

TRAIN_HINT = "python train.py --model_type gpt-micro --dataset chinese"
ENDOFTEXT = "<|endoftext|>"


class SampleError(Exception):
    """A problem the user can fix; main() prints it as one line, `error: ...`, and exits 1."""


# ----------------------------------------------------------------------------------------------
# 1. Loading a checkpoint
# ----------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """--device auto picks the fastest device present: an NVIDIA GPU, then Apple's (mps), then the CPU.
    An explicit name (cpu, cuda, cuda:1, mps) is checked here, so a typo fails in one line."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name}: not a device — use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SampleError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here "
                          f"(try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SampleError(f"--device {name}: this torch has no Apple-GPU support (try --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SampleError(f"--device {name}: sample.py runs on cpu, cuda or mps")
    return name


def newest_checkpoint(root="checkpoints"):
    """The most recently written checkpoints/*/best_model.pt: the run you trained last."""
    found = sorted(pathlib.Path(root).glob("*/best_model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SampleError(f"no checkpoint found under {root}/ — train one with: {TRAIN_HINT}")
    return found[-1]


def read_checkpoint(path):
    """torch.load with weights_only=True, turning each way it can fail into a sentence.

    weights_only=True lets the unpickler build only tensors and plain containers (dict, list,
    str, int, ...). A full pickle can run any code while loading, so a checkpoint downloaded from
    a stranger could take over the machine; that is why the checkpoint format holds no classes.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SampleError(f"no checkpoint at {path} — train one with: {TRAIN_HINT}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise SampleError(f"{path} is empty — it is not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise SampleError(f"{path} holds pickled Python objects, which weights_only loading "
                              f"refuses; this project's checkpoints hold only tensors and plain data")
        # torch.save writes a zip archive, which starts with the bytes "PK\3\4". A zip that does
        # not load was cut short — typically a run killed while it was saving.
        if head == b"PK\x03\x04":
            raise SampleError(f"{path} is truncated or damaged ({type(e).__name__}) — was training "
                              f"stopped while saving? Use another checkpoint (e.g. last.pt) or retrain")
        raise SampleError(f"{path} is not a PyTorch checkpoint ({type(e).__name__})")


def check_checkpoint(ckpt, path):
    """The keys sample.py needs must be there (a tensor, or someone else's dict, is not ours)."""
    needed = ("model", "model_config", "tokenizer")
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SampleError(f"{path} is not a checkpoint of this project (it lacks: {', '.join(missing)})")


def load_tokenizer(entry):
    """The checkpoint's `tokenizer` entry → a tiktoken.Encoding.

    {"name": "gpt2"} and {"name": "cl100k_base"} name OpenAI's vocabularies; our own BPE travels
    whole, as the dict BPETokenizer.to_dict() wrote (its tokens, split pattern and special tokens),
    so a checkpoint samples correctly even after the tokenizer file it was trained with is gone.
    """
    try:
        return get_tokenizer(entry)
    except Exception as e:
        name = entry.get("name") if isinstance(entry, dict) else entry
        raise SampleError(f"cannot rebuild the checkpoint's tokenizer {name!r}: {e}")


def build_model(ckpt, path, device):
    """GPT(GPTConfig(**model_config)) with the saved weights, in eval mode (dropout off)."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    except (TypeError, RuntimeError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(f"{path}: the weights do not fit its model_config ({first_line})")
    return model.to(device).eval()


def load_checkpoint(path, device="cpu"):
    """path → (model, encoding, ckpt): everything needed to sample, from one file."""
    ckpt = read_checkpoint(path)
    check_checkpoint(ckpt, path)
    enc = load_tokenizer(ckpt["tokenizer"])
    model = build_model(ckpt, path, device)
    return model, enc, ckpt


def checkpoint_model_type(ckpt):
    """The --model_type the checkpoint was trained with: from train_args, else the preset whose
    depth and width match model_config, else None."""
    train_args = ckpt.get("train_args") or {}
    if train_args.get("model_type"):
        return train_args["model_type"]
    cfg = ckpt["model_config"]
    for name, shape in PRESETS.items():
        if all(cfg.get(k) == v for k, v in shape.items()):
            return name
    return None


def check_flags_agree(ckpt, tokenizer=None, model_type=None):
    """The seed project's --tokenizer / --model_type flags are accepted, but the checkpoint decides:
    a model can only be read with the vocabulary it was trained on, so a mismatch is an error."""
    train_args = ckpt.get("train_args") or {}
    entry = ckpt["tokenizer"]
    held_tokenizer = {entry.get("name") if isinstance(entry, dict) else entry,
                      train_args.get("tokenizer")} - {None}
    if isinstance(entry, dict) and "tokens" in entry:
        held_tokenizer.add("bpe")                    # our own BPE, whatever file it came from
    if tokenizer is not None and tokenizer not in held_tokenizer:
        raise SampleError(f"--tokenizer {tokenizer} does not match the checkpoint, which holds the "
                          f"tokenizer {' / '.join(sorted(map(str, held_tokenizer)))} — leave the flag "
                          f"out: the checkpoint carries its own tokenizer")
    held_type = checkpoint_model_type(ckpt)
    if model_type is not None and model_type != held_type:
        raise SampleError(f"--model_type {model_type} does not match the checkpoint, which holds a "
                          f"{held_type or 'custom-sized'} model — leave the flag out")


# ----------------------------------------------------------------------------------------------
# 2. From tokens to text without "�"
# ----------------------------------------------------------------------------------------------
#
# A byte-level BPE token is a run of *bytes*, and merges follow byte-pair frequency, not
# character boundaries. A Han character is 3 UTF-8 bytes, an emoji 4, and a vocabulary often
# has no single token for them. Real cases:
#   cl100k_base, "人工智能" → 人 | 工 | b"\xe6\x99" | b"\xba" | 能     (智 = E6 99 BA is split)
#   gpt2,        "😀"       → b"\xf0\x9f\x98" | b"\x80"
#   gpt2,        "鹦鹉"     → six tokens of one byte each
# Decoding each token on its own, `enc.decode([t])`, meets b"\xe6\x99" — the start of a
# character, not a character — and can only print "�"; then b"\xba" alone is invalid too and
# prints a second "�". The character is not delayed, it is destroyed.
#
# The fix is to decode the *stream of bytes*, not each token. Python's incremental UTF-8
# decoder does exactly that: it returns the characters that are complete so far and keeps the
# unfinished tail (at most 3 bytes) for the next call. So 智 appears, whole, when its last byte
# arrives. Only a sequence that is truly invalid becomes "�" (errors="replace"), and at the end
# final=True flushes what is left: if a sample stopped mid-character, that honest "�" is the
# one you see. The concatenated pieces equal enc.decode(all tokens) exactly.

def end_of_text(enc):
    """Id of <|endoftext|>, or None for a vocabulary without one."""
    if ENDOFTEXT not in enc.special_tokens_set:
        return None
    return enc.encode_single_token(ENDOFTEXT)


def token_bytes(enc, token_id):
    """The bytes of one token. A model's vocab_size may be padded past the tokenizer's last id
    (e.g. 50304 for gpt2's 50257, a multiple of 64 is faster on GPUs); those ids have no text."""
    try:
        return enc.decode_single_token_bytes(token_id)
    except KeyError:
        return b""


def decode_stream(enc, token_ids):
    """Token ids, one at a time → text pieces, each made only of whole characters."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in token_ids:
        piece = decoder.decode(token_bytes(enc, int(token_id)))
        if piece:                 # empty while a character is still incomplete
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


# ----------------------------------------------------------------------------------------------
# 3. Generating
# ----------------------------------------------------------------------------------------------

def encode_prompt(enc, prompt, block_size):
    """Prompt text → the token ids the model starts from.

    An empty prompt starts from <|endoftext|>: during training that token separated documents,
    so after it the model begins "a new document" — the natural unconditional start. A prompt
    longer than the context keeps its last block_size tokens: the position table has only
    block_size rows, and the end of the prompt is what the continuation depends on most.
    """
    eot = end_of_text(enc)
    ids = enc.encode(prompt, allowed_special="all") if prompt else []
    if not ids:
        if eot is None:
            raise SampleError("this tokenizer has no <|endoftext|> token; give a --prompt")
        ids = [eot]
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens but the model's context is {block_size}; "
              f"only its last {block_size} tokens are used", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def stream_text(model, enc, ids, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                use_cache=True, generator=None, stop_at_eot=True):
    """Generate after the prompt ids and yield the new text piece by piece, as it is produced.

    The model and the generator must be on the same device; the model must be in eval mode.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)       # (1, T)
    eot = end_of_text(enc) if stop_at_eot else None

    def new_ids():
        for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p,
                                  use_cache=use_cache, generator=generator):
            token = int(token)                                       # (1,) → int
            if token == eot:
                return                                               # the model ended the text
            yield token

    yield from decode_stream(enc, new_ids())


def make_generator(seed, device):
    """A seeded random generator on the model's device: the same seed, the same samples."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------------------------
# 4. Scoring a text
# ----------------------------------------------------------------------------------------------
#
# The loss in nats/token depends on the tokenizer: a tokenizer with longer tokens has fewer,
# harder tokens. Bits per byte does not: the total information (nats), converted to bits
# (÷ ln 2), divided by the text's UTF-8 bytes — a property of the text, not of the tokens.
# cl100k_base and our 8k BPE are compared by bits per byte, never by loss.
#
# A text longer than the context is scored in windows of block_size tokens that slide by a
# stride. With stride = block_size/2 every token after the first window is predicted with at
# least half a context of history; each token is scored in exactly one window (targets already
# scored by the previous window are set to −1, which the loss ignores).

def score_windows(n, block_size, stride):
    """(begin, end, first_target) for each window over a sequence of n tokens.

    The window feeds ids[begin:end−1] and predicts ids[begin+1:end]; targets before first_target
    were counted by an earlier window. ids[0] is context only, never a target.
    """
    windows, scored_until, begin = [], 1, 0
    while scored_until < n:
        end = min(begin + block_size + 1, n)          # block_size inputs, block_size targets
        windows.append((begin, end, scored_until))
        scored_until, begin = end, begin + stride
    return windows


def window_batch(seq, windows):
    """Stack windows of equal length into x, y (B, T); targets scored before become −1."""
    x = torch.stack([seq[b:e - 1] for b, e, _ in windows])
    y = torch.stack([seq[b + 1:e] for b, e, _ in windows])   # stack copies: seq is untouched
    for row, (b, _, first) in enumerate(windows):
        y[row, :first - (b + 1)] = -1                 # targets at positions b+1 … first−1
    return x, y


@torch.no_grad()
def sliding_window_nats(model, ids, stride=None):
    """Total nats of ids[1:], each token predicted from the tokens before it in its window."""
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    stride = min(stride or max(1, block_size // 2), block_size)   # larger would skip tokens
    device = next(model.parameters()).device
    seq = torch.tensor(ids, dtype=torch.long)
    windows = score_windows(len(ids), block_size, stride)
    # Several windows per forward pass; the logits (B, T, vocab) bound how many fit in memory.
    per_batch = max(1, min(64, 2**25 // (block_size * vocab_size)))
    total = 0.0
    for i in range(0, len(windows), per_batch):
        by_length = {}
        for w in windows[i:i + per_batch]:            # only the last window can be shorter
            by_length.setdefault(w[1] - w[0], []).append(w)
        for group in by_length.values():
            x, y = window_batch(seq, group)
            _, loss = model(x.to(device), y.to(device))          # mean over the scored targets
            total += loss.item() * int((y != -1).sum())
    return total


def score_text(model, enc, text, stride=None):
    """The model's loss on text: dict(nats_per_token, perplexity, bits_per_byte, tokens, bytes).

    The text is preceded by <|endoftext|>, as a document is in training, so that even its first
    token is predicted and every byte of the file is paid for.
    """
    model.eval()
    tokens = enc.encode_ordinary(text)
    eot = end_of_text(enc)
    if eot is not None:
        seq = [eot] + tokens
        n_bytes = len(text.encode("utf-8"))
    else:                                           # no separator: the first token is free context
        seq = tokens
        n_bytes = len(enc.decode_bytes(tokens[1:]))
    n_scored = len(seq) - 1
    if n_scored < 1:
        raise SampleError("the text is too short to score (it needs at least one token)")
    if n_scored > 100_000:
        print(f"note: scoring {n_scored:,} tokens; this takes a while on a CPU", file=sys.stderr)
    total_nats = sliding_window_nats(model, seq, stride)
    nats_per_token = total_nats / n_scored
    return {
        "nats_per_token": nats_per_token,
        "perplexity": math.exp(nats_per_token),
        "bits_per_byte": total_nats / math.log(2) / n_bytes,
        "tokens": n_scored,
        "bytes": n_bytes,
    }


def read_score_file(path):
    """The text to score, with the two mistakes a user makes named."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SampleError(f"cannot read --score file {path}: {e.strerror or e}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(f"--score file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                          f"convert it first, e.g. iconv -f GBK -t UTF-8")
    if not text.strip():
        raise SampleError(f"--score file {path} is empty")
    return text


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with, or score text against, a trained GPT.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: the newest checkpoints/*/best_model.pt)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="<1 sharper, >1 more random, 0 = greedy (always the most likely token)")
    p.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with total probability ≥ p")
    p.add_argument("--seed", type=int, default=1337, help="random seed: the same seed, the same text")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--no_stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context for every token (slow; for comparison)")
    p.add_argument("--interactive", action="store_true", help="a prompt loop (Ctrl-D or 'exit' to leave)")
    p.add_argument("--score", metavar="FILE", default=None,
                   help="print the loss on FILE (nats/token, perplexity, bits per byte) and exit")
    p.add_argument("--tokenizer", default=None, help="accepted for the seed's scripts; must match the checkpoint")
    p.add_argument("--model_type", default=None, help="accepted for the seed's scripts; must match the checkpoint")
    return p.parse_args(argv)


def check_sampling_args(args):
    if args.temperature < 0:
        raise SampleError("--temperature must be ≥ 0 (0 means greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SampleError("--top_p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise SampleError("--top_k must be ≥ 1")
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise SampleError("--num_samples must be ≥ 1 and --max_new_tokens ≥ 0")


def utf8_output():
    """Write UTF-8 whatever the console's encoding: a Windows console (cp936, cp1252) or
    LANG=C would otherwise raise UnicodeEncodeError on the first Chinese character."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(encoding="utf-8")


def print_samples(model, enc, prompt, args, generator):
    """Print num_samples continuations of prompt, each beginning with the prompt itself."""
    ids = encode_prompt(enc, prompt, model.config.block_size)
    for i in range(args.num_samples):
        pieces = stream_text(model, enc, ids, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, use_cache=not args.no_cache, generator=generator)
        if args.no_stream:
            print(prompt + "".join(pieces), end="")
        else:
            print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)   # flush: show each piece now, not line by line
        print("\n" + ("-" * 40 if i + 1 < args.num_samples else ""), flush=True)


def interactive_loop(model, enc, args, generator):
    """Read a prompt, print samples, repeat; Ctrl-D (end of input) or `exit` leaves."""
    print("Type a prompt and press Enter; Ctrl-D or 'exit' to leave.", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return
        if prompt.strip() in ("exit", "quit"):
            return
        print_samples(model, enc, prompt, args, generator)


def print_score(path, result, enc):
    print(f"text:          {path} — {result['bytes']:,} UTF-8 bytes, {result['tokens']:,} tokens ({enc.name})")
    print(f"loss:          {result['nats_per_token']:.4f} nats/token")
    print(f"perplexity:    {result['perplexity']:.2f}")
    print(f"bits per byte: {result['bits_per_byte']:.4f}")


def run(args):
    check_sampling_args(args)
    path = pathlib.Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    device = pick_device(args.device)
    text = read_score_file(args.score) if args.score else None   # fail fast, before loading
    model, enc, ckpt = load_checkpoint(path, device)
    check_flags_agree(ckpt, args.tokenizer, args.model_type)
    if text is not None:
        print_score(args.score, score_text(model, enc, text), enc)
        return
    torch.manual_seed(args.seed)
    generator = make_generator(args.seed, device)
    if args.interactive:
        interactive_loop(model, enc, args, generator)
    else:
        print_samples(model, enc, args.prompt, args, generator)


def main(argv=None):
    args = parse_args(argv)
    utf8_output()
    try:
        run(args)
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
