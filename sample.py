"""Lesson 6 — sampling: turning a checkpoint back into text, and scoring text with it.

What you will learn here, numbered as the section banners:
  1. loading a checkpoint: the model and its tokenizer rebuilt from one file, safely
     (bpe.read_checkpoint: torch.load with weights_only=True, so no pickled code runs);
  2. generating: a prompt becomes ids (an empty one starts a new document, a long one keeps
     its end), the model streams new tokens (temperature, top-k, top-p, a seed, the KV cache),
     and bpe.decode_stream prints them as whole characters — no "�" for Chinese or emoji — until
     the model writes <|endoftext|>;
  3. chatting with a chat-tuned model: the conversation rendered in the chat template, the answer
     streamed until <|im_end|>, the history kept within the context;
  4. scoring: the model's loss on any text over sliding windows, as nats/token, perplexity and
     bits per byte — the one number that compares models with *different* tokenizers fairly.
Optional sections, for a second reading:
  5. (optional) the command line, with an interactive prompt loop.

You need: gpt.py (GPT.from_checkpoint, GPT.stream, bits_per_byte) and bpe.py (get_tokenizer,
decode_stream, ENDOFTEXT, the chat template: render_chat and IM_END, read_checkpoint,
pick_device). This file reads what train.py wrote,
but needs none of its code: sampling loads no training machinery.
This is the last lesson.

    python sample.py --prompt "人工智能"                      # newest checkpoints/*/best_model.pt
    python sample.py --checkpoint checkpoints/gpt-micro/best_model.pt --num_samples 3 --seed 7
    python sample.py --interactive --temperature 0.8 --top_p 0.95
    python sample.py --checkpoint checkpoints/chat/best_model.pt --chat --system "你是一个助手。"
    python sample.py --score my_text.txt
"""
import math
import pathlib
import sys

import torch

import bpe
from bpe import ENDOFTEXT, InputError
from gpt import GPT, bits_per_byte


# ----------------------------------------------------------------------------------------------
# 1. Loading a checkpoint
# ----------------------------------------------------------------------------------------------

def newest_checkpoint(root="checkpoints"):
    """The most recently written checkpoints/*/best_model.pt: the run you trained last."""
    found = sorted(pathlib.Path(root).glob("*/best_model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"no checkpoint found under {root}/ — train one with: {bpe.TRAIN_HINT}")
    return found[-1]


def load_checkpoint(path, device="cpu"):
    """path → (model, encoding, ckpt): everything needed to sample, from one file.

    A checkpoint is self-contained: model_config gives the model's shape, `tokenizer` names
    OpenAI's vocabulary or carries our own BPE whole (train.make_checkpoint lists every key).
    The model comes back in eval mode: dropout off, so the same seed gives the same text.
    """
    ckpt = bpe.read_checkpoint(path)
    enc = bpe.get_tokenizer(ckpt["tokenizer"])
    try:
        model = GPT.from_checkpoint(ckpt)
    except ValueError as e:                                      # weights that do not fit
        raise InputError(f"{path}: {e}") from None
    return model.to(device).eval(), enc, ckpt


# ----------------------------------------------------------------------------------------------
# 2. Generating
# ----------------------------------------------------------------------------------------------

def encode_prompt(enc, prompt, block_size):
    """Prompt text → the token ids the model starts from.

    An empty prompt starts from <|endoftext|>: during training that token separated documents,
    so after it the model begins "a new document" — the natural unconditional start. A prompt
    longer than the context keeps its last block_size tokens — the model sees no more (GPT-2's
    block has only block_size position rows; the llama block was trained on no longer text) —
    and the end of the prompt is what the continuation depends on most.
    """
    ids = enc.encode(prompt, allowed_special="all") if prompt else []
    ids = ids or [enc.eot_token]
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens but the model's context is {block_size}; "
              f"only its last {block_size} tokens are used", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def stream_text(model, enc, ids, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                use_cache=True, generator=None, repetition_penalty=1.0, stop=(ENDOFTEXT,)):
    """Generate after the prompt ids and yield the new text piece by piece, as it is produced,
    until the model writes one of the special tokens `stop` (or max_new_tokens run out).

    Each piece is whole characters (bpe.decode_stream holds back a character split across
    tokens until its last byte arrives). The model and the generator must be on one device.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)   # (1, T)
    stop_ids = {enc.encode_single_token(t) for t in stop if t in enc.special_tokens_set}

    def new_ids():
        for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p,
                                  use_cache=use_cache, generator=generator,
                                  repetition_penalty=repetition_penalty):
            if int(token) in stop_ids:           # (1,) → int
                return                           # the model ended the text (or its turn)
            yield int(token)

    yield from bpe.decode_stream(enc, new_ids())


def make_generator(seed, device):
    """A seeded random generator on the model's device: the same seed, the same samples."""
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 3. Chatting
# ----------------------------------------------------------------------------------------------
# A chat-tuned model (train.py --init_from … --dataset <chat data>) learnt conversations written
# in the chat template (bpe.py, section 6), so we talk to it in that form: the conversation so
# far, rendered, then "<|im_start|>assistant\n" — and the model writes the answer, ending it with
# <|im_end|>, where we stop. The answer joins the history, and the next question is asked after
# all of it. The history must fit the context, with room left for the answer: the oldest
# messages go first, and the system prompt (who the assistant is) always stays.

def chat_prompt(history, enc, block_size, room):
    """The ids that ask for the next answer: the system prompt and as many of the newest messages
    as fit in block_size − room tokens (a single question too long for that keeps its end)."""
    system = [m for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    while True:
        ids, _ = bpe.render_chat(system + turns, enc, reply=True)
        if len(ids) <= block_size - room:
            return ids
        if len(turns) == 1:         # one question too long: the end of its words, in its frame
            over = len(ids) - (block_size - room)                   # tokens too many
            words = len(enc.encode_ordinary(turns[0]["content"]))
            if over >= words:
                what = ("the chat template and the system prompt take" if system else
                        "the chat template takes")
                fix = "shorten --system or lower" if system else "lower"
                raise InputError(f"{what} {len(ids) - words} of the model's {block_size} tokens, "
                                 f"leaving none for a question and a {room}-token answer — "
                                 f"{fix} --max_new_tokens")
            # its words begin after the system prompt and <|im_start|>user\n
            system_ids, _ = bpe.render_chat(system, enc)
            at = len(system_ids) + 1 + len(enc.encode_ordinary(turns[0]["role"] + "\n"))
            return ids[:at] + ids[at + over:]
        turns = turns[1:]
        while turns[0]["role"] == "assistant":           # a conversation starts with a question
            turns = turns[1:]


def answer(model, enc, history, args, generator):
    """Stream the model's answer to the conversation in `history`, print it, and return it."""
    block_size = model.config.block_size
    ids = chat_prompt(history, enc, block_size, room=min(args.max_new_tokens, block_size // 2))
    pieces = []
    for piece in stream_text(model, enc, ids, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, not args.no_cache, generator, args.repetition_penalty,
                             stop=(bpe.IM_END, ENDOFTEXT)):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    return "".join(pieces)


def chat(model, enc, args, generator):
    """Talk: each message typed gets an answer, and both join the history. `/reset` forgets the
    history (the system prompt stays); Ctrl-D or `exit` leaves. With --prompt: one answer."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    if not args.prompt:
        print("Chat with the model; /reset forgets the conversation, Ctrl-D or 'exit' leaves.",
              file=sys.stderr)
    while True:
        try:
            message = args.prompt or input(">>> ")
        except EOFError:
            print()
            return
        if message.strip() in ("exit", "quit"):
            return
        if message.strip() == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": answer(model, enc, history, args,
                                                              generator)})
        if args.prompt:
            return


# ----------------------------------------------------------------------------------------------
# 4. Scoring a text
# ----------------------------------------------------------------------------------------------
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
        end = min(begin + block_size + 1, n)                     # block_size inputs and targets
        windows.append((begin, end, scored_until))
        scored_until, begin = end, begin + stride
    return windows


def window_batch(seq, windows):
    """Stack windows of equal length into x, y (B, T); targets scored before become −1."""
    x = torch.stack([seq[b:e - 1] for b, e, _ in windows])
    y = torch.stack([seq[b + 1:e] for b, e, _ in windows])      # stack copies: seq is untouched
    for row, (b, _, first) in enumerate(windows):
        y[row, :first - (b + 1)] = -1                            # targets b+1 … first−1
    return x, y


@torch.no_grad()
def sliding_window_nats(model, ids, stride=None):
    """Total nats of ids[1:], each token predicted from the tokens before it in its window."""
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    stride = min(stride or max(1, block_size // 2), block_size)  # larger would skip tokens
    device = next(model.parameters()).device
    seq = torch.tensor(ids, dtype=torch.long)
    windows = score_windows(len(ids), block_size, stride)
    # Several windows per forward pass; the logits (B, T, vocab) bound how many fit in memory.
    per_batch = max(1, min(64, 2**25 // (block_size * vocab_size)))
    total = 0.0
    for i in range(0, len(windows), per_batch):
        by_length = {}
        for w in windows[i:i + per_batch]:                       # only the last can be shorter
            by_length.setdefault(w[1] - w[0], []).append(w)
        for group in by_length.values():
            x, y = window_batch(seq, group)
            _, loss = model(x.to(device), y.to(device))          # mean over the scored targets
            total += loss.item() * int((y != -1).sum())
    return total


def score_text(model, enc, text, stride=None):
    """The model's loss on text: dict(nats_per_token, perplexity, bits_per_byte, tokens, bytes).

    The text is preceded by <|endoftext|>, as a document is in training whenever another one
    came before it, so that even its first token is predicted and every byte is paid for.
    """
    model.eval()
    seq, n_bytes = [enc.eot_token] + enc.encode_ordinary(text), len(text.encode("utf-8"))
    n_scored = len(seq) - 1
    if n_scored < 1:
        raise InputError("the text is too short to score (it needs at least one token)")
    if n_scored > 100_000:
        print(f"note: scoring {n_scored:,} tokens; this takes a while on a CPU", file=sys.stderr)
    nats_per_token = sliding_window_nats(model, seq, stride) / n_scored
    # e^700: near float's top
    return {"nats_per_token": nats_per_token, "perplexity": math.exp(min(nats_per_token, 700)),
            "bits_per_byte": bits_per_byte(nats_per_token, n_scored, n_bytes),
            "tokens": n_scored, "bytes": n_bytes}


# ----------------------------------------------------------------------------------------------
# 5. (optional) Command line
# ----------------------------------------------------------------------------------------------
# What it adds: `python sample.py` prints samples, runs a prompt loop (--interactive), or scores
# a file (--score). It also accepts the --tokenizer and --model_type of LLM Learning's generate
# command; the checkpoint decides both, so they only have to agree with it.

def parse_args(argv=None):
    p = bpe.ArgumentParser(prog="sample.py",
                           description="Generate text with, or score text against, "
                                       "a trained GPT.")
    count = bpe.number_flag(int, "≥ 1", lambda n: n >= 1)
    a = p.add_argument
    a("--checkpoint", default=None,
      help="checkpoint file (default: the newest checkpoints/*/best_model.pt)")
    a("--prompt", default="", help="text to continue (empty: start a new document)")
    a("--num_samples", type=count, default=1, help="how many samples to draw")
    a("--max_new_tokens", type=bpe.number_flag(int, "≥ 0", lambda n: n >= 0), default=200,
      help="tokens to generate per sample")
    a("--temperature", type=bpe.number_flag(float, "≥ 0", lambda t: t >= 0), default=0.8,
      help="<1 sharper, >1 more random, 0 = greedy (always the most likely token)")
    a("--top_k", type=count, default=None, help="sample only from the k most likely tokens")
    a("--top_p", type=bpe.number_flag(float, "in (0, 1]", lambda p: 0 < p <= 1), default=None,
      help="nucleus sampling: the smallest set of tokens with total probability ≥ p")
    a("--seed", type=int, default=1337, help="random seed: the same seed, the same text")
    a("--device", type=bpe.device_flag, default="auto",
      help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    a("--no_stream", action="store_true", help="print each sample when it is complete")
    a("--no_cache", action="store_true",
      help="recompute the whole context for every token (slow; to compare)")
    a("--system", default=None, help="with --chat: the system prompt, kept all conversation long")
    a("--repetition_penalty", type=bpe.number_flag(float, "≥ 1", lambda r: r >= 1), default=1.0,
      help="make every token the answer has already written less likely: its logit ÷ this if "
           "positive, × this if negative (1 = off; 1.1–1.3 stops a small model's loops)")
    mode = p.add_mutually_exclusive_group().add_argument     # at most one of these three
    mode("--interactive", action="store_true", help="a prompt loop (Ctrl-D or 'exit' to leave)")
    mode("--chat", action="store_true",
         help="talk with a chat-tuned checkpoint (with --prompt: answer once and exit)")
    mode("--score", metavar="FILE", default=None,
         help="print the loss on FILE (nats/token, perplexity, bits per byte) and exit")
    a("--tokenizer", default=None,
      help="accepted for compatibility with LLM Learning's generate command; "
           "must match the checkpoint")
    a("--model_type", default=None,
      help="accepted for compatibility with LLM Learning's generate command; "
           "must match the checkpoint")
    args = p.parse_args(argv)
    if args.system is not None and not args.chat:
        p.error("--system is the chat's system prompt: add --chat")
    return args


def check_flags_agree(ckpt, tokenizer=None, model_type=None):
    """--tokenizer and --model_type must name what the checkpoint holds: a model can only be read
    with the vocabulary it was trained on, and its shape is in the file. --tokenizer may name the
    run's own --tokenizer value, or the kind of vocabulary ("bpe" for ours)."""
    entry, settings = ckpt["tokenizer"], ckpt.get("train_args") or {}
    held = {"--tokenizer": {"bpe" if "tokens" in entry else entry["name"],
                            settings.get("tokenizer")},
            "--model_type": {settings.get("model_type")}}
    for flag, given in (("--tokenizer", tokenizer), ("--model_type", model_type)):
        if given is not None and given not in held[flag]:
            what = " / ".join(sorted(str(name) for name in held[flag] if name))
            raise InputError(f"{flag} {given} does not match the checkpoint, which holds {what} — "
                             f"leave the flag out: the checkpoint carries its own")


def utf8_output():
    """Write UTF-8 whatever the console's encoding: a Windows console (cp936, cp1252) or LANG=C
    would otherwise raise UnicodeEncodeError on the first Chinese character."""
    for stream in (sys.stdout, sys.stderr):
        if (hasattr(stream, "reconfigure")
                and (stream.encoding or "").lower().replace("-", "") != "utf8"):
            stream.reconfigure(encoding="utf-8")


def print_samples(model, enc, prompt, args, generator):
    """Print num_samples continuations of prompt, each beginning with the prompt itself."""
    ids = encode_prompt(enc, prompt, model.config.block_size)
    for i in range(args.num_samples):
        pieces = stream_text(model, enc, ids, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, not args.no_cache, generator, args.repetition_penalty)
        if args.no_stream:
            print(prompt + "".join(pieces), end="")
        else:
            print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)                 # flush: show each piece now
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


def main(argv=None):
    args = parse_args(argv)
    utf8_output()
    path = pathlib.Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    device = bpe.pick_device(args.device)
    text = bpe.read_text(args.score) if args.score else None     # fail fast, before loading
    model, enc, ckpt = load_checkpoint(path, device)
    check_flags_agree(ckpt, args.tokenizer, args.model_type)
    if text is not None:
        result = score_text(model, enc, text)
        print(f"text:          {args.score} — {result['bytes']:,} UTF-8 bytes, "
              f"{result['tokens']:,} tokens ({enc.name})")
        print(f"loss:          {result['nats_per_token']:.4f} nats/token")
        print(f"perplexity:    {result['perplexity']:.2f}")
        print(f"bits per byte: {result['bits_per_byte']:.4f}")
        return
    generator = make_generator(args.seed, device)
    if args.chat:
        if not ckpt.get("chat"):
            raise InputError(f"{path} was never chat-tuned — tune it on conversations first: "
                             f"python train.py --init_from {path} --dataset zh_idioms "
                             f"--out_dir checkpoints/chat")
        chat(model, enc, args, generator)
    elif args.interactive:
        interactive_loop(model, enc, args, generator)
    else:
        print_samples(model, enc, args.prompt, args, generator)


if __name__ == "__main__":
    sys.exit(bpe.run_command(main))
