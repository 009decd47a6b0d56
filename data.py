"""Lesson 4 — data: from a dataset name to batches of token ids.

What you will learn here, numbered as the section banners:
  1. the whole pipeline in one function, prepare(): find the source, choose the tokenizer, write
     the token files — and do nothing when nothing has changed;
  2. sources and documents: the built-in datasets, your own files and folders, each read as a
     stream of (split, document) pairs with a held-out validation tail;
  3. the tokenizer a dataset is written with: OpenAI's by name, a saved BPE, or our own BPE
     trained once on the training text;
  4. token files: every document's ids followed by <|endoftext|>, as uint16 or uint32, and a
     meta.json that says what is inside — checked before a folder is reused;
  5. reading them back: a memory-mapped tensor, and batches x = tokens[i:i+T],
     y = tokens[i+1:i+T+1]; an epoch is a seeded permutation of the windows, so a run resumes at
     exactly the next batch and several processes (DDP) share the work.
Optional sections, for a second reading:
  6. (optional) downloading without losing progress: .part files, HTTP Range, retries, checksums,
     and a mirror for readers in mainland China (HF_ENDPOINT);
  7. (optional) big sources: a 500 MB JSON array, JSON Lines and the WikiText zips read as
     streams, and --max_mb to use only their start;
  8. (optional) doing nothing twice, safely: a fingerprint of the inputs, and a folder checked
     whole before it is reused;
  9. (optional) tokenizing on every core: documents cut into tasks for worker threads;
 10. (optional) the command line.

You need: bpe.py — get_tokenizer (a fast tiktoken encoder for any of our tokenizers),
BPETokenizer.train, and the shared read_text / atomic_path / InputError.
Next lesson: train.py, which calls prepare() and BatchIterator and runs the training loop.

    python data.py --dataset shakespeare
    python data.py --dataset chinese --max_mb 50
    python data.py --dataset path/to/my_text.txt --tokenizer cl100k_base

Only the standard library, requests and torch are used: no numpy, no `datasets` package.
"""
import array
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import sys
import time
import zipfile

import requests
import torch

import bpe
from bpe import InputError

# Both data.py and train.py default to our own BPE, trained on the dataset itself: a vocabulary
# of 8,192 suits a small model (cl100k's 100,277 rows × 128 wide would be 12.8M parameters, most
# of gpt-micro) and covers more Chinese per token than either OpenAI vocabulary.
DEFAULT_TOKENIZER = "bpe"
DEFAULT_VOCAB_SIZE = 8192


# ----------------------------------------------------------------------------------------------
# 1. The pipeline: prepare()
# ----------------------------------------------------------------------------------------------
# prepare() is the whole lesson in a dozen lines; each line names the section that explains it.
# What it leaves behind, for train.py:
#
#     data/<dataset>/<tokenizer>/train.bin   every training document's ids, each followed by EOT
#                               /val.bin     the same for the validation documents
#                               /meta.json   what is inside: tokenizer, dtype, token and byte counts
#                               /tokenizer.bpe   (our own BPE only) the vocabulary, readable text

FORMAT_VERSION = 2                           # bump when the files change meaning: old folders rebuild
NOT_PREPARED = "not prepared yet"


def prepare(dataset, tokenizer=DEFAULT_TOKENIZER, data_dir="data", max_mb=None, num_proc=None,
            vocab_size=DEFAULT_VOCAB_SIZE, verbose=True):
    """Turn `dataset` into data/<dataset>/<tokenizer>/ and return that folder.

    dataset: a name in DATASETS, a path (file or folder), or NAME for data/raw/NAME/.
    tokenizer: "bpe" (our own, `vocab_size` ids, trained once here), "gpt2", "cl100k_base", the
    path of a saved BPE, or a BPETokenizer. max_mb caps the training text (validation: a tenth).
    """
    data_dir = pathlib.Path(data_dir)
    if isinstance(tokenizer, str) and tokenizer != "bpe":
        tokenizer = bpe.load_tokenizer(tokenizer)        # a name stays a name; a path → BPETokenizer
    source = find_source(str(dataset), data_dir, verbose)                          # section 2
    out = data_dir / source.name / tokenizer_folder(tokenizer, vocab_size)        # section 3
    fingerprint = make_fingerprint(source, tokenizer, vocab_size, max_mb)         # section 8
    problem = check_prepared(out, fingerprint)                                    # section 8
    if problem is None:
        say(verbose, f"{out}: already prepared, nothing to do (delete its meta.json to rebuild)")
        return out
    say(verbose and problem != NOT_PREPARED, f"{out}: preparing again: {problem}")
    with building(out):                                  # section 8: no empty folder is left behind
        (out / "meta.json").unlink(missing_ok=True)      # a half-rebuilt folder must not look done
        tokenizer = choose_tokenizer(tokenizer, source, out, vocab_size, max_mb, verbose)   # section 3
        enc = bpe.get_tokenizer(tokenizer)               # the encoder, built once, passed down
        counts = write_token_files(capped(source.documents(), max_mb), enc, out, num_proc, verbose)  # 4, 7, 9
        write_meta(out, source, tokenizer, enc, counts, max_mb, fingerprint)     # section 4
    return out


def say(verbose, message):
    """Progress goes to stderr, so that stdout stays clean for whatever the caller prints."""
    if verbose:
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# 2. Sources and documents
# ----------------------------------------------------------------------------------------------
# Every source, however it is stored, is read as a stream of (split, document) pairs, where split
# is "train" or "val" and a document is a str (an article, a file). A stream, not a list: the
# Chinese Wikipedia file alone is 500 MB, and we never hold all of it at once.
#
# Where a source brings no validation text we hold out its tail: the last VAL_FRACTION of a text
# file (cut at a line break), or the documents that start in the last VAL_FRACTION of a JSON
# file's bytes. The tail, not a random sample, so that no validation sentence sits next to a
# training sentence from the same paragraph.

VAL_FRACTION = 0.1
VAL_NAMES = ("validation.txt", "valid.txt", "val.txt")
HF_ENDPOINT = "https://huggingface.co"      # the Hugging Face Hub; HF_ENDPOINT in the environment
                                            # points at a mirror instead (section 6)

# "format" says how a download becomes documents: "json" (a JSON array of records, section 7),
# "wikitext-zip" (section 7) or "txt" (below).
DATASETS = {
    "chinese": {
        "about": "Chinese Wikipedia (2023-07-20 dump, filtered), Hugging Face dataset "
                 "pleisto/wikipedia-cn-20230720-filtered: a JSON array of {\"completion\": article}",
        "hf_path": "datasets/pleisto/wikipedia-cn-20230720-filtered/resolve/main/"
                   "wikipedia-cn-20230720-filtered.json",
        "filename": "wikipedia-cn-20230720-filtered.json",
        "format": "json",
        "sha256": None,      # not published; meta.json keeps the checksum of what was downloaded
        "size": "≈ 501 MB, 254,547 articles",
        "licence": "CC BY-SA 3.0 / GFDL (Wikipedia text)",
    },
    "wikitext": {
        "about": "WikiText-103 raw (Merity et al. 2016): Wikipedia Good and Featured articles",
        "url": "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        "filename": "wikitext-103-raw-v1.zip",
        "format": "wikitext-zip",
        "sha256": None,
        "size": "≈ 192 MB zip, ≈ 540 MB of text, 28,475 training articles",
        "licence": "CC BY-SA 3.0",
    },
    "wikitext2": {
        "about": "WikiText-2 raw (Merity et al. 2016): a 2 % subset of WikiText-103",
        "url": "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        "filename": "wikitext-2-raw-v1.zip",
        "format": "wikitext-zip",
        "sha256": None,
        "size": "≈ 4.7 MB zip, ≈ 11 MB of text, 600 training articles",
        "licence": "CC BY-SA 3.0",
    },
    "shakespeare": {
        "about": "tiny Shakespeare (Karpathy's char-rnn): 40,000 lines of the plays",
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "filename": "input.txt",
        "format": "txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "size": "1,115,394 bytes",
        "licence": "public domain (the char-rnn repository is MIT)",
    },
}


# A dataset ready to read: its folder name, the files it reads, documents() — a fresh stream of
# (split, document) pairs at each call — and a line saying where it came from.
Source = collections.namedtuple("Source", "name files documents about")


def find_source(dataset, data_dir, verbose=True):
    """A built-in name → downloaded (once); a path → read in place; NAME → data/raw/NAME/."""
    if dataset in DATASETS:
        return builtin_source(dataset, data_dir, verbose)
    path = pathlib.Path(dataset)
    if path.exists():
        return local_source(path, folder_name(path.resolve().stem if path.is_file() else path.resolve().name))
    own = data_dir / "raw" / dataset
    if own.is_dir() and "/" not in dataset and os.sep not in dataset:
        return folder_source(own, folder_name(dataset))
    if "/" in dataset or os.sep in dataset or path.suffix:
        raise InputError(f"no such file or folder: {dataset} — check the path")
    raise InputError(f"unknown dataset '{dataset}' — choose one of {', '.join(DATASETS)}, a "
                     f".txt/.jsonl file or folder, or put your text in {own}/train.txt")


def builtin_source(name, data_dir, verbose):
    """A built-in dataset: its raw file is downloaded once into data/raw/<name>/."""
    entry = DATASETS[name]
    raw = data_dir / "raw" / name / entry["filename"]
    if not raw.exists():
        url = dataset_url(entry)                                                 # section 6
        say(verbose, f"downloading {name} ({entry['size']}; {entry['licence']}) from {url}")
        mirror = "use a mirror (HF_ENDPOINT=https://hf-mirror.com), or " if "hf_path" in entry else ""
        with building(raw.parent):                       # a failure leaves no empty folder (section 8)
            download(url, raw, sha256=entry["sha256"], hint=mirror)              # section 6
    return Source(name, [raw], lambda: read_documents(raw, entry["format"]), entry["about"])


def local_source(path, name):
    """Your own text: a file, or a folder of files (folder_source)."""
    if path.is_dir():
        return folder_source(path, name)
    check_file(path)
    return Source(name, [path], lambda: read_documents(path, file_format(path)), f"file {path}")


def folder_source(folder, name):
    """A folder: train.txt with validation.txt; train.txt alone (its tail validates); else every
    .txt/.jsonl/.json file in it, each read as local_source reads a file."""
    train = folder / "train.txt"
    val = next((folder / n for n in VAL_NAMES if (folder / n).is_file()), None)
    paired = train.is_file() and val is not None
    if train.is_file():
        files = [train, val] if paired else [train]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".json"))
    if not files:
        raise InputError(f"{folder} holds no .txt, .jsonl or .json file — put your text in {folder}/train.txt")
    if val is not None and not paired:
        raise InputError(f"{folder} has {val.name} but no train.txt — name the training text train.txt")
    for f in files:
        check_file(f)

    def documents():
        if paired:
            yield "train", bpe.read_text(train)
            yield "val", bpe.read_text(val)
        else:
            for f in files:
                yield from read_documents(f, file_format(f))
    return Source(name, files, documents, f"folder {folder}")


def check_file(path):
    """Fail before any work on a file that is not there, or empty."""
    if not path.is_file():
        raise InputError(f"no such file: {path} — check the path")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty — put some text in it")


def file_format(path):
    """A local file's format from its suffix: .txt, .jsonl or .json."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise InputError(f"{path}: don't know how to read '{suffix}' files — give a .txt, .jsonl "
                         f"or .json file, or a folder of them")
    return suffix[1:]


def read_documents(path, format):
    """(split, document) pairs from one file: "txt" below; "jsonl", "json", "wikitext-zip" in
    section 7."""
    readers = {"txt": text_file_documents, "jsonl": jsonl_documents, "json": json_array_documents,
               "wikitext-zip": wikitext_documents}
    return readers[format](path)


def folder_name(name):
    """A folder-safe version of a name: letters (any script), digits, '.', '-', '_'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"


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


# ----------------------------------------------------------------------------------------------
# 3. The tokenizer of a dataset
# ----------------------------------------------------------------------------------------------
# Each tokenizer gets its own folder under data/<dataset>/, named so a person sees which it is:
# gpt2, cl100k_base, bpe8192 (ours, trained here), or <name>-<hash> for a BPE you bring (the hash
# of its tokens: two vocabularies with one name never share a folder).

BPE_TRAIN_MB = 10                            # our BPE learns from at most this much training text


def tokenizer_folder(tokenizer, vocab_size):
    """The folder name under data/<dataset>/ for this tokenizer."""
    if tokenizer == "bpe":
        return f"bpe{vocab_size}"
    if isinstance(tokenizer, str):
        return tokenizer
    return f"{folder_name(tokenizer.name)}-{bpe_digest(tokenizer)[:8]}"


def bpe_digest(tokenizer):
    """sha256 of a BPETokenizer's tokens, pattern and special tokens."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


def choose_tokenizer(tokenizer, source, out, vocab_size, max_mb, verbose):
    """The tokenizer to write `out` with: a tiktoken name as it is; a BPE saved in the folder as
    tokenizer.bpe — trained from the source for "bpe" (once: an intact saved one is reused)."""
    if isinstance(tokenizer, str) and tokenizer != "bpe":
        return tokenizer
    path = out / "tokenizer.bpe"
    if tokenizer == "bpe":
        name = bpe_name(source, vocab_size, max_mb)           # says what it is made from (section 8)
        try:
            saved = bpe.BPETokenizer.load(path) if path.is_file() else None
        except InputError:
            saved = None
        if saved is not None and saved.name == name:
            return saved
        tokenizer = train_bpe(source, vocab_size, max_mb, name, verbose)
    tokenizer.save(path)
    return tokenizer


def train_bpe(source, vocab_size, max_mb, name, verbose):
    """Our BPE (bpe.py), trained on the first BPE_TRAIN_MB MB of training text: seconds, not
    minutes, and plenty to learn the common merges."""
    budget = min(BPE_TRAIN_MB, max_mb) if max_mb is not None else BPE_TRAIN_MB
    docs = [doc for _, doc in capped(source.documents(), budget, splits=("train",))]
    say(verbose, f"training a {vocab_size}-token BPE on {sum(map(len, docs)):,} characters ...")
    return bpe.BPETokenizer.train("\n".join(docs), vocab_size, name=name)


def load_tokenizer(folder):
    """The tokenizer a prepared folder was written with: its name, or our BPE from tokenizer.bpe."""
    name = load_meta(folder)["tokenizer"]
    return bpe.BPETokenizer.load(pathlib.Path(folder) / "tokenizer.bpe") if name == "bpe" else name


# ----------------------------------------------------------------------------------------------
# 4. Token files and meta.json
# ----------------------------------------------------------------------------------------------
# A split's file is every document's token ids followed by <|endoftext|>, concatenated:
#
#     doc₁ ids, EOT, doc₂ ids, EOT, …        written as little-endian uint16 or uint32
#
# uint16 holds ids 0 … 65,535: enough for gpt2 (50,257) and our BPEs, and half the bytes;
# cl100k_base has 100,277 ids and needs uint32. A flat array has no structure to parse, so
# training can map it into memory: the OS reads only the windows a batch touches.

def itemsize_for(enc):
    return 2 if enc.n_vocab <= 2 ** 16 else 4


def encode_to_bytes(enc, text, itemsize):
    """The token ids of `text` (special-token text read as plain text) as little-endian bytes,
    `itemsize` (2 or 4) bytes per id."""
    ids = array.array("H" if itemsize == 2 else "I", enc.encode_ordinary(text))   # C types of 2, 4 bytes
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def write_token_files(documents, enc, out, num_proc, verbose):
    """Write out/train.bin and out/val.bin; return {split: {"tokens", "bytes", "docs"}}.

    The documents are encoded on worker threads (section 9) and come back in order. Both files
    are written under temporary names and renamed only when complete (bpe.atomic_path).
    """
    itemsize = itemsize_for(enc)
    counts = {split: {"tokens": 0, "bytes": 0, "docs": 0} for split in ("train", "val")}
    started = last_print = time.time()
    with bpe.atomic_path(out / "train.bin") as train_temp, bpe.atomic_path(out / "val.bin") as val_temp:
        with open(train_temp, "wb") as train_file, open(val_temp, "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            for split, ids, text_bytes, docs_ended in encode_in_parallel(documents, enc, itemsize, num_proc):
                files[split].write(ids)
                counts[split]["tokens"] += len(ids) // itemsize
                counts[split]["bytes"] += text_bytes
                counts[split]["docs"] += docs_ended
                if verbose and time.time() - last_print > 1:       # a line that overwrites itself
                    done = (counts["train"]["bytes"] + counts["val"]["bytes"]) / 1e6
                    print(f"\r  tokenized {done:,.1f} MB", end="", file=sys.stderr, flush=True)
                    last_print = time.time()
        if counts["train"]["bytes"] == 0:
            raise InputError(f"no training text found for {out.parent.name} — check the input is not "
                             f"blank, or raise --max_mb")
    mb, seconds = (counts["train"]["bytes"] + counts["val"]["bytes"]) / 1e6, time.time() - started
    say(verbose, f"\r{out}: train {counts['train']['tokens']:,} tokens, val {counts['val']['tokens']:,} "
                 f"from {mb:,.1f} MB of text in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s)")
    return counts


def write_meta(out, source, tokenizer, enc, counts, max_mb, fingerprint):
    """meta.json: what the folder holds, written last — its presence means the folder is done."""
    meta = {
        "dataset": source.name,
        "source": source.about,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else "bpe",   # "bpe": see tokenizer.bpe
        "vocab_size": enc.n_vocab,
        "eot_token": enc.eot_token,
        "dtype": "uint16" if itemsize_for(enc) == 2 else "uint32",
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "train_bytes": counts["train"]["bytes"],   # UTF-8 bytes of text: bits per byte divides by these
        "val_bytes": counts["val"]["bytes"],
        "train_docs": counts["train"]["docs"],
        "val_docs": counts["val"]["docs"],
        "max_mb": max_mb,
        "sources": [{"file": str(f), "bytes": f.stat().st_size, "sha256": sha256_of(f)} for f in source.files],
        "fingerprint": fingerprint,
    }
    bpe.write_text_atomically(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# 5. Reading it back: tokens and batches
# ----------------------------------------------------------------------------------------------

def load_meta(folder):
    """meta.json of a prepared folder, as a dict."""
    path = pathlib.Path(folder) / "meta.json"
    hint = "run: python data.py --dataset NAME (train.py does it for you)"
    if not path.is_file():
        raise InputError(f"no prepared data in {folder} (no meta.json) — {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:                                       # cut short, or not JSON at all
        meta = None
    keys = ("tokenizer", "dtype", "train_tokens", "val_tokens", "train_bytes", "val_bytes")
    if not isinstance(meta, dict) or any(key not in meta for key in keys):
        raise InputError(f"{path} is damaged — delete it and prepare again: {hint}")
    return meta


def load_tokens(folder, split):
    """The token ids of `split` ("train" or "val") as a 1-D tensor *mapped* from the .bin file:
    nothing is read until a window is indexed, so a 10 GB file costs no memory up front."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}' — use 'train' or 'val'")
    dtype = getattr(torch, load_meta(folder)["dtype"])
    path = pathlib.Path(folder) / f"{split}.bin"
    n = path.stat().st_size // dtype.itemsize
    if n == 0:
        return torch.empty(0, dtype=dtype)
    # shared=False maps the file copy-on-write: reading is free, writes would never reach disk.
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


# A language model learns to predict token t+1 from tokens ≤ t. From one window of T+1 ids:
#
#     x = tokens[i   : i+T]        the input          (T,)
#     y = tokens[i+1 : i+T+1]      the targets: x shifted left by one
#
# so position t of y is the next token after x[0..t]: T predictions per window.
# For training we use the non-overlapping windows starting at 0, T, 2T, … — every token is a
# target once per epoch. An epoch visits them in the order of torch.randperm seeded with
# seed + epoch, so (epoch, position) is all it takes to resume at exactly the next batch.
# With DDP, rank r takes the permutation's elements r, r + world_size, …: disjoint shares.

def gather_windows(tokens, starts, block_size, device):
    """Windows at `starts` → (x, y), each (B, T) int64 on `device`."""
    rows = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])   # (B, T+1)
    rows = rows.long()                                       # embedding lookups want int64
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()                    # (B, T), (B, T)
    if torch.device(device).type == "cuda":
        # pinned (page-locked) memory lets the copy run asynchronously with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(tokens, block_size, batch_size, generator, device="cpu"):
    """`batch_size` windows at random offsets (any start, overlaps allowed): for loss estimates."""
    if len(tokens) <= block_size:
        raise InputError(f"only {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1} "
                         f"— lower --block_size or use more data")
    # the last valid start is len − T − 1, so that y's last id exists
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    return gather_windows(tokens, starts, block_size, device)


class BatchIterator:
    """Epochs of shuffled, non-overlapping windows, resumable to the exact next batch.

    next_batch() → (x, y), each (batch_size, block_size) int64 on `device`. An epoch ends after
    steps_per_epoch batches; the windows that would not fill a last batch are dropped, so a batch
    never mixes two epochs, and `epoch` then counts the epochs completed.
    """

    def __init__(self, tokens, block_size, batch_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.n_windows = (len(tokens) - 1) // block_size    # window k needs ids kT … kT + T
        self.windows_per_epoch = self.n_windows // world_size    # per rank; equal for all ranks
        self.steps_per_epoch = self.windows_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            need = world_size * batch_size * block_size + 1
            raise InputError(f"{len(tokens):,} tokens make {self.n_windows} windows of {block_size}; "
                             f"one batch on each of {world_size} process(es) needs {need:,} tokens "
                             f"— lower --batch_size/--block_size or use more data")
        self.epoch, self.position = 0, 0                     # epochs completed; batches served
        self.order = None                                    # this epoch's windows, made lazily

    def next_batch(self):
        """The next (x, y) in this epoch's order; after the last one, the next epoch reshuffles."""
        if self.order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n_windows, generator=generator)   # (n_windows,)
            self.order = order[self.rank::self.world_size][: self.windows_per_epoch]
        i = self.position * self.batch_size
        starts = self.order[i:i + self.batch_size] * self.block_size      # (B,) token offsets
        batch = gather_windows(self.tokens, starts, self.block_size, self.device)
        self.position += 1
        if self.position == self.steps_per_epoch:            # roll over now: epoch = completed
            self.epoch, self.position, self.order = self.epoch + 1, 0, None
        return batch

    def state_dict(self):
        """Where the iterator stands (epoch, position), and what that position means: the
        number of windows and of processes sharing them."""
        return {"epoch": self.epoch, "position": self.position,
                "n_windows": self.n_windows, "world_size": self.world_size}

    def load_state_dict(self, state):
        for key in ("n_windows", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise InputError(f"the saved data position has {key}={state[key]}, this run "
                                 f"{getattr(self, key)} — resume with the same data, --block_size "
                                 f"and process count, or start without --resume")
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), None


# ----------------------------------------------------------------------------------------------
# 6. (optional) Downloading without losing progress
# ----------------------------------------------------------------------------------------------
# What it adds: a 500 MB download over a flaky connection that survives being cut. HTTP lets a
# client ask for the rest of a file: the header `Range: bytes=N-` means "from byte N to the end".
# A server that supports it answers 206 Partial Content (and says which bytes in Content-Range);
# one that does not answers 200 with the whole file, and then we must start over, not append.
# The bytes go to `dest.part`; only a complete file whose checksum matches is renamed to `dest`,
# so the existence of `dest` itself means "complete and correct".

BACKOFF_S = 1.0                              # first pause between tries; it doubles (1, 2, 4, 8 s)
CHUNK_BYTES = 1 << 16                        # read the response 64 KiB at a time


def dataset_url(entry):
    """Where a built-in dataset is downloaded from. Hugging Face files go through HF_ENDPOINT
    when it is set, the way the huggingface_hub library does it, e.g.
    HF_ENDPOINT=https://hf-mirror.com for readers who cannot reach huggingface.co."""
    if "hf_path" in entry:
        return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/") + "/" + entry["hf_path"]
    return entry["url"]


class Retry(Exception):
    """A failure worth another try: a cut connection, a timeout, a 5xx answer."""


class NoConnection(Exception):
    """The host could not be reached at all (no network, DNS failure, refused)."""


def sha256_of(path):
    """The file's SHA-256, read a megabyte at a time: a 500 MB file never sits in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def show_progress(done, total, resumed_from, started, final=False):
    """One self-overwriting status line on stderr: size, percent, speed."""
    # "\r" returns to the start of the line: each update overwrites the one before.
    rate = (done - resumed_from) / max(time.time() - started, 1e-6)     # bytes/s of this try
    line = f"\r  {done / 1e6:8.1f} MB" + (f" / {total / 1e6:.1f} MB ({100 * done / total:5.1f} %)" if total else "")
    print(line + f"  {rate / 1e6:6.2f} MB/s", end="\n" if final else "", file=sys.stderr, flush=True)


def check_status(response, url):
    """An HTTP status → go on (200/206), try again (5xx, 408, 429), or stop at once."""
    code = response.status_code
    if code in (200, 206):
        return
    # 5xx: the server failed, not the request; 408 Request Timeout and 429 Too Many Requests
    # likewise pass with time.
    if code >= 500 or code in (408, 429):
        raise Retry(f"the server answered {code}")
    raise InputError(f"{url} answered HTTP {code} — {'the file has moved; ' if code in (404, 410) else ''}"
                     f"download it yourself and give its path: --dataset path/to/file")


def fetch_once(url, part, timeout):
    """One try: ask for the bytes `part` lacks and append them; raise Retry if cut short."""
    # The .part file holds what earlier tries received: ask only for the rest.
    have = part.stat().st_size if part.exists() else 0
    # identity: no gzip, so the bytes we count are the bytes of the file and offsets line up
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        # stream=True: the body arrives chunk by chunk as we read it, never whole in memory.
        # timeout bounds each wait for the server, not the whole download.
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise NoConnection(type(e).__name__) from e
    with response:
        if response.status_code == 416 and have:             # we hold more than the server has
            part.unlink()
            raise Retry("the partial file did not match the server's file")
        check_status(response, url)
        if response.status_code == 206:
            # 206 Partial Content: Range was honoured. Its Content-Range must start exactly where
            # our bytes end, or appending would splice two different pieces of the file.
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
            if not start or int(start.group(1)) != have:
                part.unlink()
                raise Retry("the server resumed at the wrong byte")
            mode = "ab"
        else:                                                # 200: the whole file, from byte 0
            # (the server ignored Range, or this is the first try): start the file over
            have, mode = 0, "wb"
        # urllib3 drops the bytes of its last read when it finds the body short; we check the
        # length ourselves below, so let it hand over every byte that did arrive.
        response.raw.enforce_content_length = False
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done, started, last_print = have, time.time(), 0.0
        try:
            with open(part, mode) as f:
                for chunk in response.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - last_print > 0.5:
                        show_progress(done, total, have, started)
                        last_print = time.time()
        except requests.RequestException as e:               # the connection broke mid-body
            raise Retry(f"connection broken after {done:,} bytes ({type(e).__name__})") from e
        finally:
            show_progress(done, total, have, started, final=True)
    if total is not None and done != total:
        raise Retry(f"connection closed after {done:,} of {total:,} bytes")


def download(url, dest, sha256=None, retries=5, timeout=30, backoff=None, hint=""):
    """Download `url` to `dest` and return it as a pathlib.Path.

    Up to 1 + `retries` tries, pausing backoff·2^k seconds before try k+1; each try resumes from
    the bytes already in `dest.part`. A 404 fails at once. When `sha256` is given and does not
    match, the partial file is deleted and nothing is ever left at `dest`. `hint` is added to
    the message when the host cannot be reached at all (it ends in ", or ").
    """
    dest = pathlib.Path(dest)
    if dest.exists():                        # only ever renamed into place whole and checked
        return dest
    bpe.make_writable_folder(dest.parent, "--data_dir")
    part = dest.with_name(dest.name + ".part")
    backoff = BACKOFF_S if backoff is None else backoff
    manual = f"download {url} yourself and give its path: --dataset path/to/{dest.name}"
    reached_host = False
    for attempt in range(retries + 1):
        try:
            fetch_once(url, part, timeout)
            break
        except NoConnection as e:
            if not reached_host:           # never got a single answer: retrying only delays this
                host = requests.utils.urlparse(url).netloc
                raise InputError(f"cannot reach {host} ({e}) — {hint}{manual}, or train on any "
                                 f"local text offline: --dataset path/to/file.txt") from None
            error = e
        except Retry as e:
            reached_host, error = True, e
        if attempt < retries:
            # Exponential back-off: a blip costs a second, and a struggling server gets more room
            # at each try instead of a stampede of retries.
            pause = backoff * 2 ** attempt
            print(f"  download: {error}; retrying in {pause:.2g} s ({attempt + 1}/{retries})", file=sys.stderr)
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
# 7. (optional) Big sources: streams, and --max_mb
# ----------------------------------------------------------------------------------------------
# What it adds: JSON, JSON Lines and the WikiText zips read a document at a time, so a 500 MB
# source never sits in memory whole; and --max_mb, which tokenizes only the first N MB of
# training text — a first run on the Chinese Wikipedia then takes minutes, not an hour. (The
# source is still read to its end, where the validation text is; our BPE's training stops as
# soon as it has its text.) A JSON record's text is its "text" field, else its "completion"
# field (the Chinese Wikipedia dump's name for it).

JSON_BLOCK_CHARS = 1 << 20                   # how much of a JSON array to read at a time
SEPARATORS = re.compile(r"[\s,]*")           # between array elements: whitespace and commas


def record_text(record, where):
    """The text of one JSON record (`where` says which, for the error message)."""
    text = record.get("text", record.get("completion")) if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise InputError(f"{where}: expected an object with a \"text\" (or \"completion\") string "
                         f"field, like {{\"text\": \"...\"}}")
    return text


def route_tail(items, size):
    """(byte offset, document) → (split, document): documents starting in the last VAL_FRACTION
    of the file's `size` bytes are validation. One document of lookahead makes sure that at
    least the last one is, even in a tiny file. Blank documents are skipped."""
    boundary = (1 - VAL_FRACTION) * size
    held = None                              # the previous document, kept back one step
    for offset, doc in items:
        if not doc.strip():
            continue
        if held is not None:
            yield "train", held
            held = None
        if offset >= boundary:
            yield "val", doc
        else:
            held = doc
    if held is not None:                                     # no document started in the tail
        yield "val", held


def json_array_documents(path):
    """A JSON array of {"text"|"completion": ...} objects (the Chinese Wikipedia format): each
    element's byte offset decides its split (route_tail)."""
    path = pathlib.Path(path)
    records = ((offset, record_text(record, f"{path}, element at byte {offset:,}"))
               for offset, record in iter_json_array(path))
    return route_tail(records, path.stat().st_size)


def iter_json_array(path):
    """Yield (byte offset, element) for each element of a top-level JSON array, a block at a time.

    json.load would build all 254,547 articles at once; instead we keep a sliding text buffer and
    let JSONDecoder.raw_decode parse one element starting at `pos`. If the element runs past the
    end of the buffer, raw_decode fails, and we append the next block and try again.
    """
    # Offsets are counted in bytes of the file (the validation tail is a share of its bytes),
    # but the buffer holds characters, and a Han character is 3 bytes. So we keep a running
    # conversion: buf[:seen] is seen_bytes long in UTF-8, and each element is measured once.
    decoder = json.JSONDecoder()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:       # -sig: skip a BOM if any
            buf, eof = f.read(JSON_BLOCK_CHARS), False
            pos = SEPARATORS.match(buf).end()
            if buf[pos:pos + 1] != "[":
                raise InputError(f"{path} is not a JSON array of documents — use a .jsonl file (one "
                                 f"{{\"text\": ...}} per line) or a .txt file")
            pos += 1
            base, seen, seen_bytes = 0, 0, 0        # bytes before buf[0]; buf[:seen] is seen_bytes long
            while True:
                pos = SEPARATORS.match(buf, pos).end()
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    if pos == len(buf):
                        raise json.JSONDecodeError("buffer empty", buf, pos)
                    element, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    # Either the element runs past the end of the buffer (read the next block
                    # and try again), or, with the whole file read, the file itself is broken.
                    if eof:
                        raise InputError(f"{path}: broken or truncated JSON near byte "
                                         f"{base + seen_bytes:,} — delete it and download it again") from None
                    base += seen_bytes + len(buf[seen:pos].encode("utf-8"))
                    more = f.read(JSON_BLOCK_CHARS)
                    buf, pos, seen, seen_bytes, eof = buf[pos:] + more, 0, 0, 0, not more
                    continue
                seen_bytes += len(buf[seen:pos].encode("utf-8"))       # bytes up to this element
                seen = pos
                yield base + seen_bytes, element
                pos = end
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text — convert it to UTF-8 first") from None


def jsonl_documents(path):
    """A .jsonl file: one document per line, in its "text" (or "completion") field."""
    def lines():
        # Read bytes, not text: a line's byte offset places it in the train or validation part,
        # and json.loads decodes UTF-8 itself (saying on which line it fails).
        with open(path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
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
                yield start, record_text(record, f"{path}, line {number}")
    return route_tail(lines(), pathlib.Path(path).stat().st_size)


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


def capped(documents, max_mb, splits=("train", "val")):
    """Stop at max_mb MB of training text and max_mb/10 MB of validation text (UTF-8 bytes);
    a document that does not fit is cut at its last line break (or character) that does.
    splits=("train",): training text only, and stop reading as soon as it is full."""
    if max_mb is None:
        yield from documents
        return
    # Budgets in UTF-8 bytes, the unit --max_mb speaks of; validation gets the share it has in
    # the whole source, so a capped run keeps the same proportions.
    left = {"train": max_mb * 1e6, "val": max_mb * 1e6 * VAL_FRACTION if "val" in splits else 0}
    for split, doc in documents:
        if left[split] <= 0:
            if max(left.values()) <= 0:
                return                                       # both splits full: stop reading
            continue
        raw = doc.encode("utf-8")
        if len(raw) > left[split]:
            head = raw[:int(left[split])]
            cut = head.rfind(b"\n") + 1                         # just after the last line break,
            if cut == 0:                                         # or with none, the last whole
                cut = bpe.utf8_boundary(head)                    # character
            doc, left[split] = head[:cut].decode("utf-8"), 0
        else:
            left[split] -= len(raw)
        if doc:
            yield split, doc


# ----------------------------------------------------------------------------------------------
# 8. (optional) Doing nothing twice, safely
# ----------------------------------------------------------------------------------------------
# What it adds: a second prepare() of the same data returns at once — but only when the folder
# is whole and made from the same inputs. The fingerprint records every input the files depend
# on; a change to any of them (the text edited, another tokenizer or --max_mb) means "rebuild".
# And a folder can be damaged behind our back — a disk filled up, a run was killed, a file was
# cut short — where training on a stub would be silently wrong. Sizes are cheap to check;
# re-reading gigabytes would not be.

def file_stamp(path):
    """A file's path, size and modification time (in nanoseconds)."""
    stat = pathlib.Path(path).stat()
    return [str(pathlib.Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def bpe_name(source, vocab_size, max_mb):
    """The name our BPE is saved under: bpe<vocab_size>-<hash of what it learns from> (the source
    files and the budget of text), so a saved one is reused only for the very same inputs."""
    inputs = [file_stamp(f) for f in source.files] + [min(BPE_TRAIN_MB, max_mb or BPE_TRAIN_MB)]
    return f"bpe{vocab_size}-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:8]}"


def make_fingerprint(source, tokenizer, vocab_size, max_mb):
    """Everything the files depend on; an equal fingerprint means there is nothing to redo.

    Source files are known by path, size and modification time, not by a checksum: any edit
    changes the time, and hashing 500 MB at every start would cost seconds for nothing.
    """
    if tokenizer == "bpe":
        tokenizer_id = ["bpe", vocab_size]
    elif isinstance(tokenizer, str):
        tokenizer_id = tokenizer
    else:
        tokenizer_id = ["bpe-file", bpe_digest(tokenizer)]
    return {"format": FORMAT_VERSION, "files": [file_stamp(f) for f in source.files],
            "tokenizer": tokenizer_id, "max_mb": max_mb, "val_fraction": VAL_FRACTION}


@contextlib.contextmanager
def building(folder):
    """Create `folder` (and the folders above it) for a build; if the build fails before writing
    anything there, remove what it created — a file that is not UTF-8 leaves no empty folders."""
    created = [f for f in (folder, *folder.parents) if not f.exists()]   # deepest first
    bpe.make_writable_folder(folder, "--data_dir")
    try:
        yield
    except BaseException:
        for f in created:
            if f.is_dir() and not any(f.iterdir()):
                f.rmdir()
        raise


def check_prepared(out, fingerprint):
    """None if `out` is complete and made from the same inputs; else what is wrong with it.

    A folder can be damaged behind our back (a disk filled up, a file was edited or cut short),
    so meta.json must parse, the tokenizer file must load and each .bin must hold exactly the
    ids meta.json counts — checking sizes is cheap; re-reading gigabytes would not be.
    """
    try:
        meta = load_meta(out)                                # it parses, with the keys we read
    except InputError:
        return NOT_PREPARED if not (out / "meta.json").exists() else "its meta.json is damaged"
    if meta.get("fingerprint") != fingerprint:
        return "the text, the tokenizer or --max_mb changed"
    # A .bin file is nothing but ids, so its size must be exactly tokens × bytes per id: a file
    # cut short by a full disk, or replaced by hand, cannot pass.
    itemsize = {"uint16": 2, "uint32": 4}.get(meta.get("dtype"))
    for split in ("train", "val"):
        path = out / f"{split}.bin"
        expected = itemsize * meta[f"{split}_tokens"] if itemsize else None
        if not path.is_file() or path.stat().st_size != expected:
            return f"{split}.bin does not hold the {meta[f'{split}_tokens']:,} tokens meta.json counts"
    if meta["tokenizer"] == "bpe":
        try:
            bpe.BPETokenizer.load(out / "tokenizer.bpe")
        except InputError:
            return "its tokenizer.bpe is missing or damaged"
    return None


# ----------------------------------------------------------------------------------------------
# 9. (optional) Tokenizing on every core
# ----------------------------------------------------------------------------------------------
# What it adds: prepare() at the speed of all cores (1.8× on two). Documents are grouped into
# tasks of about TASK_CHARS characters (a long document is cut at a line break); `num_proc`
# worker threads encode tasks while the main thread reads the source and writes the results in
# order. Threads, not processes: tiktoken's encoder is Rust code that releases Python's GIL while
# it works, so threads really run on separate cores — and they share the text and the encoder
# instead of copying them to other processes and back (measured on 32 MB: 1.96× with 2 threads
# against 1.58× with 2 processes). Tasks do not depend on the number of workers, so 1 or 16
# workers write identical files.
#
# Cutting a document right after a "\n" that stands between two non-space characters does not
# change its tokens: in both the GPT-2 and cl100k patterns no piece spans such a boundary (that
# "\n" is a piece of its own, or ends the piece of punctuation before it, and the next character
# starts a new piece). So the parts encode exactly like the whole.

TASK_CHARS = 1 << 18                         # ≈ 256 K characters: many tasks per core, little overhead
# Where a document may be cut without changing its tokens: just after a line break that comes
# between two characters other than whitespace ("text\ntext"). A run of two or more whitespace
# characters must stay whole: at the end of a part, GPT-2's pattern would take "\n\n" as one
# piece (\s++$), where the whole document splits it in two.
LINE_START = re.compile(r"(?<=\S)\n(?=\S)")


def cut_document(doc):
    """Parts of about TASK_CHARS characters that concatenate back to `doc`."""
    start = 0
    while len(doc) - start > 2 * TASK_CHARS:
        # a line start between 1× and 2× TASK_CHARS ahead: parts stay near TASK_CHARS
        match = LINE_START.search(doc, start + TASK_CHARS, start + 2 * TASK_CHARS)
        # no such line break in 2 × TASK_CHARS characters (rare): cut anyway, which can change a
        # token or two at the cut
        end = match.start() + 1 if match else start + TASK_CHARS
        yield doc[start:end]
        start = end
    yield doc[start:]


def make_tasks(documents):
    """Group (split, document) pairs into tasks (split, [parts], [does part end a document?]).

    A task never mixes the two splits (its ids go to one file), and where one task ends depends
    only on the documents — never on how many workers there are — so the files come out the
    same with 1 worker or 16.
    """
    split_now, parts, ends, size = None, [], [], 0
    for split, doc in documents:
        doc_parts = list(cut_document(doc))
        for i, part in enumerate(doc_parts):
            if parts and (split != split_now or size + len(part) > TASK_CHARS):
                yield split_now, parts, ends
                parts, ends, size = [], [], 0
            split_now = split
            parts.append(part)
            ends.append(i == len(doc_parts) - 1)
            size += len(part)
    if parts:
        yield split_now, parts, ends


def encode_task(task, enc, itemsize):
    """(split, parts, ends) → (split, the ids as bytes, UTF-8 bytes of text, documents ended)."""
    split, parts, ends = task
    # <|endoftext|> in the file's own layout: the same little-endian bytes as every other id
    eot = enc.eot_token.to_bytes(itemsize, "little")
    out = bytearray()
    for part, end in zip(parts, ends):
        out += encode_to_bytes(enc, part, itemsize)
        if end:
            out += eot                                       # the document is over: <|endoftext|>
    return split, out, sum(len(part.encode("utf-8")) for part in parts), sum(ends)


def cpu_count():
    """Cores this process may use (on Linux, respecting taskset and container limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_in_parallel(documents, enc, itemsize, num_proc=None):
    """encode_task over make_tasks(documents) on `num_proc` threads (default: every core this
    process may use), yielding the results in order."""
    num_proc = num_proc or cpu_count()
    tasks = make_tasks(documents)
    if num_proc == 1:                        # no threads: the plain path the parallel one must equal
        yield from (encode_task(task, enc, itemsize) for task in tasks)
        return
    # Results must be written in the order of the documents. A queue of futures, taken from the
    # front, gives that order; keeping it at two tasks a worker keeps every core busy while
    # bounding memory to a few tasks, however large the source.
    with concurrent.futures.ThreadPoolExecutor(num_proc) as pool:
        pending = collections.deque()                        # at most 2 tasks a worker in flight
        for task in tasks:
            pending.append(pool.submit(encode_task, task, enc, itemsize))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# 10. (optional) Command line
# ----------------------------------------------------------------------------------------------
# What it adds: `python data.py --dataset NAME` downloads and tokenizes without training, e.g. to
# prepare on a machine with a network and train on one without. It writes what train.py reads.

def main(argv=None):
    """python data.py --dataset NAME [...]: prepare one dataset, or every built-in one (all)."""
    parser = bpe.ArgumentParser(prog="data.py", description="Download and tokenize a dataset into "
                                                            "data/<dataset>/<tokenizer>/{train,val}.bin.")
    parser.add_argument("--dataset", default="shakespeare",
                        help=f"{', '.join(DATASETS)}, all (every built-in one), a .txt/.jsonl file, a "
                             f"folder, or NAME for data/raw/NAME/")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="bpe (train our own once, the default, as in train.py), gpt2, cl100k_base, "
                             "or the path of a saved BPE")
    parser.add_argument("--vocab_size", type=bpe.VOCAB_SIZE_FLAG, default=DEFAULT_VOCAB_SIZE,
                        help="vocabulary size when --tokenizer bpe")
    parser.add_argument("--max_mb", type=bpe.number_flag(float, 0, low_open=True), default=None,
                        help="tokenize at most this many MB of training text (and a tenth of it of "
                             "validation text)")
    parser.add_argument("--num_proc", type=bpe.number_flag(int, 1), default=None,
                        help="tokenizing threads (default: all cores)")
    parser.add_argument("--data_dir", default="data", help="where raw and prepared data live")
    args = parser.parse_args(argv)
    # --dataset all: every built-in dataset in turn (LLM Learning's `download_data.py --dataset
    # all`); a failure stops at that dataset, and running again skips those already prepared.
    for name in list(DATASETS) if args.dataset == "all" else [args.dataset]:
        prepare(name, args.tokenizer, args.data_dir, max_mb=args.max_mb, num_proc=args.num_proc,
                vocab_size=args.vocab_size)


if __name__ == "__main__":
    sys.exit(bpe.run_command(main))
