"""Lesson 4: data — from a URL to batches of token ids.

What you will learn here
    1. How to download a large file so that a broken connection costs nothing: stream it to a
       ``.part`` file, resume with an HTTP ``Range`` request, check its SHA-256, and only then
       give it its real name.
    2. How raw sources (a 500 MB JSON array, a zip of WikiText, a plain ``.txt``) become a stream
       of *documents*, split into training and validation text.
    3. How that text becomes one flat array of token ids on disk (``train.bin`` / ``val.bin``),
       tokenized on every CPU core, with a ``meta.json`` that says what is inside.
    4. How training batches are cut from that array: ``x = tokens[i : i+T]``, ``y = tokens[i+1 :
       i+T+1]``, an epoch being a seeded permutation of the windows, so that a run can stop and
       resume at exactly the next batch, and so that several GPUs (DDP ranks) share the work.

What you need from the previous lesson (bpe.py)
    ``bpe.get_tokenizer(name)`` gives a fast encoder (a ``tiktoken.Encoding``) for ``"gpt2"``,
    ``"cl100k_base"`` or a file saved by ``BPETokenizer.save``, and ``BPETokenizer.train`` learns
    our own vocabulary. Every tokenizer has the special token ``<|endoftext|>`` (``eot_token``);
    here it marks where one document ends and the next begins.

Read next: train.py, which calls ``prepare`` and ``BatchIterator`` and runs the training loop.

The API other files use
    DATASETS                                   name → where the text comes from, size, licence
    class DataError(ValueError)                a one-line message that names the fix
    download(url, dest, sha256=None, retries=5, timeout=30, backoff=None) -> pathlib.Path
    prepare(dataset, tokenizer_name="gpt2", data_dir="data", max_mb=None, num_proc=None,
            vocab_size=8192, verbose=True) -> pathlib.Path      # data/<dataset>/<tokenizer>/
    load_meta(folder) -> dict
    load_tokens(folder, split) -> torch.Tensor                   # 1-D, memory-mapped
    class BatchIterator(tokens, block_size, batch_size, seed=0, rank=0, world_size=1,
                        device="cpu")            # next_batch(), state_dict(), load_state_dict()
    get_batch(tokens, block_size, batch_size, generator, device="cpu") -> (x, y)
    main(argv=None)                             # python data.py --dataset NAME|PATH|all ...

Command line
    python data.py --dataset shakespeare --tokenizer gpt2
    python data.py --dataset chinese --tokenizer cl100k_base --max_mb 50
    python data.py --dataset path/to/my_text.txt --tokenizer bpe --vocab_size 8192

Only the standard library, ``requests`` and ``torch`` are used: no numpy, no ``datasets``.
"""
import argparse
import array
import collections
import concurrent.futures
import functools
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


class DataError(ValueError):
    """A problem with the user's data or connection; the message is one line that names the fix."""


# =================================================================================================
# Part 1. Downloading without losing progress
# =================================================================================================
# A 500 MB download over a flaky connection will break sooner or later. HTTP lets a client ask
# for the rest of a file: the request header `Range: bytes=N-` means "from byte N to the end".
# A server that supports it answers 206 Partial Content (and says which bytes in Content-Range);
# one that does not answers 200 with the whole file, and then we must start over, not append.
# The bytes go to `dest.part`; only a complete file whose checksum matches is renamed to `dest`,
# so the existence of `dest` itself means "complete and correct".

BACKOFF_S = 1.0  # first pause between tries; it doubles each time (1, 2, 4, 8 s). Tests shrink it.
CHUNK_BYTES = 1 << 16  # read the response 64 KiB at a time


class _Retry(Exception):
    """A failure worth another try: a cut connection, a timeout, a 5xx answer."""


class _NoConnection(Exception):
    """The host could not be reached at all (no network, DNS failure, refused)."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(done, total, resumed_from, started, final=False):
    """One self-overwriting status line on stderr: size, percent, speed, time left."""
    elapsed = max(time.time() - started, 1e-6)
    rate = (done - resumed_from) / elapsed  # bytes/s of *this* attempt
    line = f"\r  {done / 1e6:8.1f} MB"
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:4.0f} s" if eta != float("inf") else "   ? s"
        line += f" / {total / 1e6:.1f} MB ({100 * done / total:5.1f} %)  ETA {eta_text}"
    line += f"  {rate / 1e6:6.2f} MB/s"
    print(line, end="\n" if final else "", file=sys.stderr, flush=True)


def _resume_offset(content_range):
    """'bytes 400-999/1000' → 400: where the server's partial answer starts."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else -1


def _check_status(response, url):
    """Turn an HTTP status into: go on (200/206), try again (5xx, 408, 429), or stop at once."""
    code = response.status_code
    if code in (200, 206):
        return
    if code in (404, 410):
        raise DataError(f"{url} answered {code} Not Found — the file has moved; fix the URL in "
                        f"data.DATASETS or train on a local file: --dataset path/to/file.txt")
    if code >= 500 or code in (408, 429):
        raise _Retry(f"the server answered {code}")
    raise DataError(f"{url} answered HTTP {code} — check the URL, or train on a local file: "
                    f"--dataset path/to/file.txt")


def _fetch_once(url, part, timeout):
    """One try: ask for the bytes `part` lacks and append them; raise _Retry if cut short."""
    have = part.stat().st_size if part.exists() else 0
    # identity: no gzip, so the bytes we count are the bytes of the file and offsets line up.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _NoConnection(type(e).__name__) from e
    with response:
        if response.status_code == 416 and have:  # we hold more than the server has: start over
            part.unlink()
            raise _Retry("the partial file did not match the server's file")
        _check_status(response, url)
        if response.status_code == 206:
            if _resume_offset(response.headers.get("Content-Range")) != have:
                part.unlink()
                raise _Retry("the server resumed at the wrong byte")
            mode = "ab"
        else:  # 200: the server sent the whole file (it ignored Range, or we asked for all)
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
                        _progress(done, total, have, started)
                        last_print = time.time()
        except requests.RequestException as e:  # the connection broke mid-body
            _progress(done, total, have, started, final=True)
            raise _Retry(f"connection broken after {done:,} bytes ({e.__class__.__name__})") from e
        _progress(done, total, have, started, final=True)
    if total is not None and done != total:
        raise _Retry(f"connection closed after {done:,} of {total:,} bytes")


def download(url, dest, sha256=None, retries=5, timeout=30, backoff=None):
    """Download `url` to `dest` (a path) and return it as a pathlib.Path.

    Up to 1 + `retries` tries, pausing backoff·2^k seconds before try k+1; each try resumes from
    the bytes already in `dest.part`. A 404 fails at once. When `sha256` is given and does not
    match, the file is deleted and DataError is raised, so nothing is ever left at `dest`.
    """
    dest = pathlib.Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    backoff = BACKOFF_S if backoff is None else backoff
    reached_host = False
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout)
            break
        except _NoConnection as e:
            if not reached_host:  # never got a single answer: retrying only delays the message
                host = requests.utils.urlparse(url).netloc
                raise DataError(f"cannot reach {host} ({e}) — to train offline, "
                                f"give a local file: python data.py --dataset path/to/file.txt") from None
            error = e
        except _Retry as e:
            reached_host, error = True, e
        if attempt < retries:
            pause = backoff * 2 ** attempt
            print(f"  download: {error}; retrying in {pause:.2g} s ({attempt + 1}/{retries})",
                  file=sys.stderr)
            time.sleep(pause)
    else:
        raise DataError(f"download of {url} failed after {retries + 1} tries ({error}) — run the "
                        f"same command again to resume, or use --dataset path/to/file.txt")
    if sha256 is not None:
        got = _sha256(part)
        if got != sha256.lower():
            part.unlink()
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} — "
                            f"the file was deleted; run again, or update the checksum in DATASETS")
    os.replace(part, dest)  # atomic on one file system: dest is whole or absent
    return dest


# =================================================================================================
# Part 2. From raw files to documents
# =================================================================================================
# Every source, however it is stored, is read as a stream of (split, document) pairs, where split
# is "train" or "val" and a document is a str (an article, a file). Streams, not lists: the
# Chinese Wikipedia file alone is 500 MB, and we never hold all of it at once.
#
# Where a source brings no validation text we hold out its tail: the last VAL_FRACTION of each
# text file (cut at a line break), or the documents that start in the last VAL_FRACTION of a
# JSON/JSONL file's bytes. The tail, not a random sample, so that no validation sentence sits
# next to a training sentence from the same paragraph.

VAL_FRACTION = 0.1
JSON_BLOCK_CHARS = 1 << 20  # how much of a JSON array to read at a time (tests make it small)
VAL_NAMES = ("validation.txt", "valid.txt", "val.txt")


def _read_text(path):
    """The exact text of a UTF-8 file (no newline translation), or a DataError saying how to fix it."""
    data = pathlib.Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}) "
                        f"— convert it first, e.g. iconv -f GBK -t UTF-8 {path} > fixed.txt") from None


def _split_tail(text):
    """Cut `text` into (train, val) near 1 − VAL_FRACTION of its length, at a line break if any."""
    target = int(len(text) * (1 - VAL_FRACTION))
    after = text.find("\n", target)
    if 0 <= after < len(text) - 1:  # a line break with text after it: cut just past it
        return text[: after + 1], text[after + 1:]
    before = text.rfind("\n", 0, target)
    cut = before + 1 if before >= 0 else target  # one long line: cut it mid-line
    return text[:cut], text[cut:]


def _text_file_docs(path):
    """A .txt file is one document: its first 90 % trains, its last 10 % validates."""
    train, val = _split_tail(_read_text(path))
    yield "train", train
    yield "val", val


def _document_text(record, where):
    """The text of one JSON record: its "text" field, else its "completion" field."""
    text = record.get("text", record.get("completion")) if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise DataError(f"{where}: expected an object with a \"text\" (or \"completion\") string "
                        f"field, like {{\"text\": \"...\"}}")
    return text


def _route_tail(items, size):
    """(byte offset, document) → (split, document): documents starting in the last VAL_FRACTION
    of the file's `size` bytes are validation. One document of lookahead guarantees that at least
    the last one is, even in a tiny file."""
    boundary = (1 - VAL_FRACTION) * size
    held = None
    for offset, doc in items:
        if held is not None:
            yield "train", held
            held = None
        if offset >= boundary:
            yield "val", doc
        else:
            held = doc
    if held is not None:  # no document started in the tail: the last one becomes validation
        yield "val", held


_SEPARATORS = re.compile(r"[\s,]*")  # between array elements: whitespace and one comma


def _iter_json_array(path, block_chars=None):
    """Yield (byte offset, element) for each element of a top-level JSON array, reading the file
    a block at a time.

    json.load would build all 254,547 articles at once; instead we keep a sliding text buffer and
    let JSONDecoder.raw_decode parse one element starting at `pos`. If the element runs past the
    end of the buffer, raw_decode fails, and we append the next block and try again.
    """
    block_chars = block_chars or JSON_BLOCK_CHARS
    try:
        yield from _parse_json_array(path, block_chars)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text — convert it to UTF-8 first") from None


def _parse_json_array(path, block_chars):
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", newline="") as f:
        buf, eof = f.read(block_chars), False
        pos = _SEPARATORS.match(buf).end()
        if buf[pos:pos + 1] != "[":
            raise DataError(f"{path} is not a JSON array of documents — use a .jsonl file (one "
                            f"{{\"text\": ...}} per line) or a .txt file")
        pos += 1
        base = 0  # bytes of the file before buf[0]
        seen, seen_bytes = 0, 0  # buf[:seen] is seen_bytes long in UTF-8
        while True:
            pos = _SEPARATORS.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos == len(buf):
                    raise json.JSONDecodeError("buffer empty", buf, pos)
                element, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise DataError(f"{path}: broken or truncated JSON near byte "
                                    f"{base + seen_bytes:,} — delete it and download it again") from None
                base += seen_bytes + len(buf[seen:pos].encode("utf-8"))
                more = f.read(block_chars)
                buf, pos, seen, seen_bytes, eof = buf[pos:] + more, 0, 0, 0, not more
                continue
            seen_bytes += len(buf[seen:pos].encode("utf-8"))  # count bytes up to this element
            seen = pos
            yield base + seen_bytes, element
            pos = end


def _json_array_docs(path):
    """A JSON array of {"text"|"completion": ...} objects (the Chinese Wikipedia format)."""
    path = pathlib.Path(path)
    items = ((offset, _document_text(record, f"{path}, element at byte {offset:,}"))
             for offset, record in _iter_json_array(path))
    return _route_tail(((o, d) for o, d in items if d), path.stat().st_size)


def _jsonl_lines(path):
    """(byte offset, text) for each non-blank line of a JSON Lines file."""
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{path}, line {number}: not UTF-8 text — convert the file to "
                                f"UTF-8, e.g. iconv -f GBK -t UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg}) — each line must "
                                f"be one object like {{\"text\": \"...\"}}") from None
            text = _document_text(record, f"{path}, line {number}")
            if text:
                yield start, text


def _jsonl_docs(path):
    """A .jsonl file: one document per line, in its "text" (or "completion") field."""
    return _route_tail(_jsonl_lines(path), pathlib.Path(path).stat().st_size)


# An article title in WikiText is a line " = Title = " (sections are " = = Section = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n$")


def _wikitext_docs(zip_path, folder):
    """WikiText raw: train and valid files from the zip; each article (from one title line to the
    next) becomes a document, read line by line without unpacking the zip."""
    with zipfile.ZipFile(zip_path) as archive:
        for split, member in (("train", "wiki.train.raw"), ("val", "wiki.valid.raw")):
            with archive.open(f"{folder}/{member}") as raw:
                lines = []
                for line in io.TextIOWrapper(raw, encoding="utf-8", newline=""):
                    if _WIKITEXT_TITLE.match(line) and "".join(lines).strip():
                        yield split, "".join(lines)
                        lines = []
                    lines.append(line)
                if lines:
                    yield split, "".join(lines)


DATASETS = {
    "chinese": {
        "about": "Chinese Wikipedia (2023-07-20 dump, filtered) from the Hugging Face Hub "
                 "dataset pleisto/wikipedia-cn-20230720-filtered: one JSON array of "
                 "{\"completion\": article, \"source\": ...}",
        "url": "https://huggingface.co/datasets/pleisto/wikipedia-cn-20230720-filtered/resolve/"
               "main/wikipedia-cn-20230720-filtered.json",
        "filename": "wikipedia-cn-20230720-filtered.json",
        "sha256": None,  # not published; meta.json records the checksum of what was downloaded
        "size": "≈ 501 MB, 254,547 articles",
        "licence": "CC BY-SA 3.0 / GFDL (Wikipedia text)",
        "split": "articles starting in the last 10 % of the file's bytes are validation",
        "docs": _json_array_docs,
    },
    "wikitext": {
        "about": "WikiText-103 raw (Merity et al. 2016): Wikipedia Good and Featured articles",
        "url": "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        "filename": "wikitext-103-raw-v1.zip",
        "sha256": None,
        "size": "≈ 192 MB zip, ≈ 540 MB of text, 28,475 training articles",
        "licence": "CC BY-SA 3.0",
        "split": "its own wiki.train.raw / wiki.valid.raw",
        "docs": functools.partial(_wikitext_docs, folder="wikitext-103-raw"),
    },
    "wikitext2": {
        "about": "WikiText-2 raw (Merity et al. 2016): a 2 % subset of WikiText-103",
        "url": "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        "filename": "wikitext-2-raw-v1.zip",
        "sha256": None,
        "size": "≈ 4.7 MB zip, ≈ 11 MB of text, 600 training articles",
        "licence": "CC BY-SA 3.0",
        "split": "its own wiki.train.raw / wiki.valid.raw",
        "docs": functools.partial(_wikitext_docs, folder="wikitext-2-raw"),
    },
    "shakespeare": {
        "about": "tiny Shakespeare (Karpathy's char-rnn): 40,000 lines of the plays",
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
               "input.txt",
        "filename": "input.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "size": "1,115,394 bytes",
        "licence": "public domain (the char-rnn repository is MIT)",
        "split": "first 90 % train, last 10 % validation (cut at a line break)",
        "docs": _text_file_docs,
    },
}

# How each kind of local file becomes (split, document) pairs.
_FILE_READERS = {".txt": _text_file_docs, ".jsonl": _jsonl_docs, ".json": _json_array_docs}


class _Source:
    """A dataset ready to read: its folder name, the files it reads, and its document stream."""

    def __init__(self, name, files, docs, about):
        self.name, self.files, self.docs, self.about = name, files, docs, about


def _sanitize(name):
    """A folder-safe version of a name: letters (any script), digits, '.', '-', '_'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"


def _check_file(path):
    if not path.is_file():
        raise DataError(f"no such file: {path} — check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty — put some text in it")


def _folder_source(folder, name):
    """A folder: train.txt (+ validation.txt), else every .txt/.jsonl/.json file in it."""
    train = folder / "train.txt"
    if train.is_file():
        val = next((folder / n for n in VAL_NAMES if (folder / n).is_file()), None)
        files = [train] + ([val] if val else [])
        for f in files:
            _check_file(f)

        def docs():
            if val is None:
                yield from _text_file_docs(train)
            else:
                yield "train", _read_text(train)
                yield "val", _read_text(val)
        return _Source(name, files, docs, f"folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FILE_READERS)
    if not files:
        raise DataError(f"{folder} holds no .txt, .jsonl or .json file — put your text in "
                        f"{folder}/train.txt")
    for f in files:
        _check_file(f)

    def docs():
        for f in files:
            yield from _FILE_READERS[f.suffix.lower()](f)
    return _Source(name, files, docs, f"folder {folder}")


def _local_source(path, name):
    if path.is_dir():
        return _folder_source(path, name)
    _check_file(path)
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: don't know how to read '{path.suffix}' files — give a .txt, "
                        f".jsonl or .json file, or a folder of them")
    return _Source(name, [path], lambda: reader(path), f"file {path}")


def _builtin_source(name, data_dir, verbose):
    entry = DATASETS[name]
    raw = data_dir / "raw" / name / entry["filename"]
    if not raw.exists():
        if verbose:
            print(f"downloading {name} ({entry['size']}; {entry['licence']}) from {entry['url']}",
                  file=sys.stderr)
        download(entry["url"], raw, sha256=entry["sha256"])
    return _Source(name, [raw], lambda: entry["docs"](raw), entry["about"])


def _resolve_source(dataset, data_dir, verbose=True):
    """Built-in name → download it; a path → read it; NAME with data/raw/NAME/ → your own data."""
    if dataset in DATASETS:
        return _builtin_source(dataset, data_dir, verbose)
    path = pathlib.Path(dataset)
    if path.exists():
        return _local_source(path, _sanitize(path.resolve().stem if path.is_file() else path.resolve().name))
    own = data_dir / "raw" / dataset
    if own.is_dir() and os.sep not in dataset and "/" not in dataset:
        return _folder_source(own, _sanitize(dataset))
    if "/" in dataset or os.sep in dataset or path.suffix:
        raise DataError(f"no such file or folder: {dataset} — check the path")
    raise DataError(f"unknown dataset '{dataset}' — choose one of {', '.join(DATASETS)}, all, "
                    f"a .txt/.jsonl file or folder, or put your text in {own}/train.txt")


def _truncate_utf8(raw, limit):
    """The longest prefix of UTF-8 bytes `raw` within `limit` bytes, ending at a line break if
    there is one, and never inside a character."""
    cut = raw.rfind(b"\n", 0, limit) + 1
    if cut == 0:
        cut = limit
        while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # 10xxxxxx: inside a multi-byte character
            cut -= 1
    return raw[:cut].decode("utf-8")


def _capped(docs, max_mb):
    """Stop at max_mb MB of training text and max_mb/10 MB of validation text (UTF-8 bytes)."""
    if max_mb is None:
        yield from docs
        return
    left = {"train": max_mb * 1e6, "val": max_mb * 1e6 * VAL_FRACTION}
    for split, doc in docs:
        if left[split] <= 0:
            if max(left.values()) <= 0:
                return  # both splits full: stop reading the source
            continue
        raw = doc.encode("utf-8")
        if len(raw) > left[split]:
            doc, left[split] = _truncate_utf8(raw, int(left[split])), 0
        else:
            left[split] -= len(raw)
        if doc:
            yield split, doc


# =================================================================================================
# Part 3. Tokenizing into .bin files
# =================================================================================================
# The output of one split is every document's token ids followed by <|endoftext|>, concatenated:
#
#     doc₁ ids, EOT, doc₂ ids, EOT, …        written as little-endian uint16 or uint32
#
# uint16 holds ids 0 … 65,535: enough for gpt2 (50,257) and halves the file; cl100k_base has
# 100,277 ids and needs uint32. A flat array has no structure to parse, so training can read it
# memory-mapped: the OS pages in only the windows a batch touches.
#
# Parallelism: documents are grouped into tasks of about PIECE_CHARS characters (a long document
# is cut at a line break); `num_proc` worker threads encode tasks while the main thread reads the
# source and writes results in order. Threads, not processes: tiktoken's encoder is Rust code
# that releases Python's GIL while it works, so threads really run on separate cores — and they
# share the text and the encoder instead of copying them to other processes and back (measured
# here on 32 MB: 1.96× with 2 threads against 1.58× with 2 processes). The tasks do not depend
# on the number of workers, so 1 or 16 write identical files.

PIECE_CHARS = 1 << 18  # ≈ 256 K characters per task: many tasks per core, little overhead each
BPE_TRAIN_MB = 10  # our own BPE learns from at most this much training text, so it takes seconds
FORMAT_VERSION = 1  # bump when the .bin layout changes, so old folders are rebuilt
_LINE_START = re.compile(r"\n(?=\S)")

# Cutting a document right after a "\n" that is followed by a non-space character does not change
# its tokens: in both the GPT-2 and cl100k split patterns no pre-token spans such a boundary
# ("\n" before a letter or digit is its own pre-token). So pieces encode exactly like the whole.


def _cut_document(doc):
    """Yield pieces of about PIECE_CHARS characters that concatenate back to `doc`."""
    start = 0
    while len(doc) - start > 2 * PIECE_CHARS:
        match = _LINE_START.search(doc, start + PIECE_CHARS, start + 2 * PIECE_CHARS)
        end = match.start() + 1 if match else start + PIECE_CHARS  # no line break: cut anyway
        yield doc[start:end]
        start = end
    yield doc[start:]


def _tasks(docs):
    """Group (split, document) pairs into tasks (split, [pieces], [ends a document?])."""
    split_now, pieces, ends, size = None, [], [], 0
    for split, doc in docs:
        chunks = list(_cut_document(doc))
        for i, piece in enumerate(chunks):
            if pieces and (split != split_now or size + len(piece) > PIECE_CHARS):
                yield split_now, pieces, ends
                pieces, ends, size = [], [], 0
            split_now = split
            pieces.append(piece)
            ends.append(i == len(chunks) - 1)
            size += len(piece)
    if pieces:
        yield split_now, pieces, ends


_WORKER = {}  # the encoder all workers share: {"spec", "enc", "eot", "itemsize"}


def _get_encoder(spec):
    import bpe  # the previous lesson; imported here so this file loads even while bpe.py changes
    return bpe.get_tokenizer(spec)


def _init_worker(spec, itemsize):
    """Load the encoder once (tiktoken encoders are safe to share between threads)."""
    if _WORKER.get("spec") != spec:
        enc = _get_encoder(spec)
        _WORKER.update(spec=spec, enc=enc, eot=enc.eot_token)
    _WORKER["itemsize"] = itemsize


def _ids_to_bytes(enc, text, itemsize):
    """The token ids of `text` (special tokens read as plain text) as little-endian bytes,
    `itemsize` (2 or 4) bytes per id.

    tiktoken can hand back the ids as one packed uint32 buffer (what its encode_to_numpy uses)
    instead of a list of Python ints; skipping the list saves about a fifth of the time.
    """
    fast = getattr(getattr(enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
    ids = fast(text, set()) if fast else array.array("I", enc.encode_ordinary(text))
    raw = bytes(memoryview(ids).cast("B"))  # 4 bytes per id, in this machine's byte order
    if sys.byteorder == "big":
        swapped = array.array("I", raw)
        swapped.byteswap()
        raw = swapped.tobytes()
    if itemsize == 4:
        return raw
    # uint32 → uint16: an id < 65,536 lives in the low two bytes, which little-endian puts first
    # in each group of four: keep bytes 0 and 1 of every 4.
    out = bytearray(len(raw) // 2)
    out[0::2], out[1::2] = raw[0::4], raw[1::4]
    return out


def _encode_task(task):
    """(split, pieces, ends) → (split, bytes of the ids, UTF-8 bytes of text, documents ended)."""
    split, pieces, ends = task
    enc, itemsize = _WORKER["enc"], _WORKER["itemsize"]
    eot = _WORKER["eot"].to_bytes(itemsize, "little")
    out = bytearray()
    for piece, end in zip(pieces, ends):
        out += _ids_to_bytes(enc, piece, itemsize)
        if end:
            out += eot  # the document is over: <|endoftext|>
    text_bytes = sum(len(piece.encode("utf-8")) for piece in pieces)
    return split, out, text_bytes, sum(ends)


def _encode_all(tasks, spec, itemsize, num_proc):
    """Yield _encode_task results in order, computed on `num_proc` worker threads."""
    _init_worker(spec, itemsize)
    if num_proc == 1:
        yield from map(_encode_task, tasks)
        return
    with concurrent.futures.ThreadPoolExecutor(num_proc) as pool:
        pending = collections.deque()  # at most 2 tasks per worker in flight: bounded memory
        for task in tasks:
            pending.append(pool.submit(_encode_task, task))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _tokenize(docs, spec, dtype_name, out, num_proc, verbose):
    """Write out/train.bin and out/val.bin; return token, byte and document counts per split."""
    counts = {f"{s}_{k}": 0 for s in ("train", "val") for k in ("tokens", "bytes", "docs")}
    itemsize = {"uint16": 2, "uint32": 4}[dtype_name]
    temp = {s: out / f"{s}.bin.tmp" for s in ("train", "val")}
    files = {s: open(path, "wb") for s, path in temp.items()}
    started = last_print = time.time()
    printed = False
    try:
        for split, ids, text_bytes, docs_ended in _encode_all(_tasks(docs), spec, itemsize, num_proc):
            files[split].write(ids)
            counts[f"{split}_tokens"] += len(ids) // itemsize
            counts[f"{split}_bytes"] += text_bytes
            counts[f"{split}_docs"] += docs_ended
            if verbose and time.time() - last_print > 1:
                done = (counts["train_bytes"] + counts["val_bytes"]) / 1e6
                print(f"\r  tokenized {done:,.1f} MB of text ({done / (time.time() - started):.1f} MB/s)",
                      end="", file=sys.stderr, flush=True)
                last_print, printed = time.time(), True
    finally:
        for f in files.values():
            f.close()
    if printed:
        print(file=sys.stderr)
    if counts["train_bytes"] == 0:
        for path in temp.values():
            path.unlink()
        raise DataError(f"no training text found in {out.parent.name} — check the input is not "
                        f"blank, or raise --max_mb")
    for split, path in temp.items():
        os.replace(path, out / f"{split}.bin")
    return counts


def _tokenizer_folder(tokenizer_name, vocab_size):
    """Folder name under data/<dataset>/ for a tokenizer: gpt2, cl100k_base, bpe8192, <file stem>."""
    if tokenizer_name == "bpe":
        return f"bpe{vocab_size}"
    if tokenizer_name in ("gpt2", "cl100k_base"):
        return tokenizer_name
    path = pathlib.Path(tokenizer_name)
    if not path.is_file():
        raise DataError(f"unknown tokenizer '{tokenizer_name}' — use gpt2, cl100k_base, bpe, or "
                        f"the path of a file saved by BPETokenizer.save")
    return _sanitize(path.stem)


def _file_stamp(path):
    stat = pathlib.Path(path).stat()
    return [str(pathlib.Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _fingerprint(source, tokenizer_name, vocab_size, max_mb):
    """Everything the output depends on; equal fingerprints mean there is nothing to redo."""
    tokenizer = [tokenizer_name, vocab_size] if tokenizer_name == "bpe" else tokenizer_name
    if tokenizer_name not in ("bpe", "gpt2", "cl100k_base"):
        tokenizer = _file_stamp(tokenizer_name)
    return {"format": FORMAT_VERSION, "files": [_file_stamp(f) for f in source.files],
            "tokenizer": tokenizer, "max_mb": max_mb, "val_fraction": VAL_FRACTION,
            "piece_chars": PIECE_CHARS}


def _write_json(path, obj):
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temp, path)


def _up_to_date(out, fingerprint, tokenizer_name):
    meta_path = out / "meta.json"
    if not meta_path.is_file() or not all((out / f"{s}.bin").is_file() for s in ("train", "val")):
        return False
    if tokenizer_name == "bpe" and not (out / "tokenizer.bpe").is_file():
        return False
    return json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint


def _train_bpe(source, vocab_size, max_mb, path, verbose):
    """Train our BPE (bpe.py) on the first BPE_TRAIN_MB MB of training text and save it."""
    import bpe
    budget = min(BPE_TRAIN_MB, max_mb) if max_mb is not None else BPE_TRAIN_MB
    docs = [doc for split, doc in _capped(source.docs(), budget) if split == "train"]
    if verbose:
        print(f"training a {vocab_size}-token BPE on {sum(map(len, docs)):,} characters ...",
              file=sys.stderr)
    tokenizer = bpe.BPETokenizer.train("\n".join(docs), vocab_size)
    tokenizer.save(str(path))


def _checksums(files):
    return [{"file": str(f), "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files]


def _cpu_count():
    """Cores this process may use (on Linux, respecting taskset/containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(dataset, tokenizer_name="gpt2", data_dir="data", max_mb=None, num_proc=None,
            vocab_size=8192, verbose=True):
    """Turn `dataset` into data/<dataset>/<tokenizer>/{train.bin, val.bin, meta.json}; return
    the folder. Running it again with nothing changed does nothing (and says so)."""
    data_dir = pathlib.Path(data_dir)
    folder_name = _tokenizer_folder(tokenizer_name, vocab_size)
    source = _resolve_source(str(dataset), data_dir, verbose)
    out = data_dir / source.name / folder_name
    fingerprint = _fingerprint(source, tokenizer_name, vocab_size, max_mb)
    if _up_to_date(out, fingerprint, tokenizer_name):
        if verbose:
            print(f"{out}: already prepared, nothing to do (delete its meta.json to rebuild)",
                  file=sys.stderr)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a half-rebuilt folder must not look complete
    spec = tokenizer_name
    if tokenizer_name == "bpe":
        spec = str((out / "tokenizer.bpe").resolve())
        if not (out / "tokenizer.bpe").is_file():
            _train_bpe(source, vocab_size, max_mb, out / "tokenizer.bpe", verbose)
    elif folder_name not in ("gpt2", "cl100k_base"):
        spec = str(pathlib.Path(tokenizer_name).resolve())
    enc = _get_encoder(spec)
    dtype = "uint16" if enc.n_vocab <= 2 ** 16 else "uint32"
    num_proc = max(1, num_proc or _cpu_count())
    if verbose:
        print(f"tokenizing {source.about} with {pathlib.Path(spec).name} ({dtype}) on "
              f"{num_proc} thread{'s' if num_proc > 1 else ''} ...", file=sys.stderr)
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        # hash the source files on a thread while the workers tokenize, instead of after them
        checksums = helper.submit(_checksums, source.files)
        counts = _tokenize(_capped(source.docs(), max_mb), spec, dtype, out, num_proc, verbose)
    meta = {
        "dataset": source.name,
        "source": source.about,
        # the tokenizer as bpe.get_tokenizer accepts it; our own BPE lives next to the .bin files
        "tokenizer": "tokenizer.bpe" if tokenizer_name == "bpe" else spec,
        "vocab_size": enc.n_vocab,
        "eot_token": enc.eot_token,
        "dtype": dtype,
        **counts,  # train_tokens, train_bytes (UTF-8 bytes of text, for bits per byte), ...
        "max_mb": max_mb,
        "sources": checksums.result(),
        "fingerprint": fingerprint,
    }
    _write_json(out / "meta.json", meta)
    if verbose:
        seconds = time.time() - started
        mb = (counts["train_bytes"] + counts["val_bytes"]) / 1e6
        print(f"{out}: train {counts['train_tokens']:,} tokens ({counts['train_bytes'] / 1e6:,.1f} MB), "
              f"val {counts['val_tokens']:,} tokens ({counts['val_bytes'] / 1e6:,.1f} MB) "
              f"in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s)", file=sys.stderr)
    return out


def load_meta(folder):
    """meta.json of a prepared folder; a tokenizer file inside the folder becomes an absolute path."""
    path = pathlib.Path(folder) / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared data in {folder} (no meta.json) — run: python data.py "
                        f"--dataset NAME --tokenizer NAME")
    meta = json.loads(path.read_text(encoding="utf-8"))
    local = pathlib.Path(folder) / meta["tokenizer"]
    if meta["tokenizer"] not in ("gpt2", "cl100k_base") and local.is_file():
        meta["tokenizer"] = str(local.resolve())
    return meta


def load_tokens(folder, split):
    """The token ids of `split` ("train" or "val") as a 1-D tensor mapped from the .bin file:
    nothing is read until a window is indexed, so a 10 GB file costs no memory up front."""
    if split not in ("train", "val"):
        raise DataError(f"unknown split '{split}' — use 'train' or 'val'")
    dtype = getattr(torch, load_meta(folder)["dtype"])
    path = pathlib.Path(folder) / f"{split}.bin"
    n = path.stat().st_size // dtype.itemsize
    if n == 0:
        return torch.empty(0, dtype=dtype)
    # shared=False maps the file copy-on-write: reading is free, writes would never reach disk.
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


# =================================================================================================
# Part 4. Batches
# =================================================================================================
# A language model learns to predict token t+1 from tokens ≤ t. From one window of T+1 ids:
#
#     x = tokens[i   : i+T]        the input          (T,)
#     y = tokens[i+1 : i+T+1]      the targets: x shifted left by one
#
# so position t of y is the next token after x[0..t]: T predictions per window.
#
# For training we use the non-overlapping windows starting at 0, T, 2T, … — every token is a
# target once per epoch. An epoch visits them in the order of torch.randperm seeded with
# seed + epoch, so (epoch, position) is all it takes to resume at exactly the next batch.
# With DDP, rank r takes the permutation's elements r, r + world_size, …: disjoint shares.


def _gather(tokens, starts, block_size, device):
    """Windows at `starts` → (x, y), each (B, T) int64 on `device`."""
    rows = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
    rows = rows.long()  # embedding lookups want int64; the file may hold uint16
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T), (B, T)
    device = torch.device(device)
    if device.type == "cuda":
        # pinned (page-locked) memory lets the copy run asynchronously with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(tokens, block_size, batch_size, generator, device="cpu"):
    """`batch_size` windows at random offsets (any start, overlapping allowed) for loss estimates."""
    if len(tokens) <= block_size:
        raise DataError(f"only {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1} "
                        f"— lower --block_size or use more data")
    # the last valid start is len − T − 1, so that y's last id exists
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    return _gather(tokens, starts, block_size, device)


class BatchIterator:
    """Epochs of shuffled, non-overlapping windows, resumable to the exact next batch.

    next_batch() → (x, y), each (batch_size, block_size) int64 on `device`. An epoch ends after
    steps_per_epoch batches; the windows that would not fill a last batch are dropped, so a batch
    never mixes two epochs, and `epoch` then counts the epochs completed.
    """

    def __init__(self, tokens, block_size, batch_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.n_windows = (len(tokens) - 1) // block_size  # window k needs ids kT … kT + T
        self.windows_per_epoch = self.n_windows // world_size  # per rank; equal for all ranks
        self.steps_per_epoch = self.windows_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            need = world_size * batch_size * block_size + 1
            raise DataError(f"{len(tokens):,} tokens make {self.n_windows} windows of "
                            f"{block_size}; one batch on each of {world_size} process(es) needs "
                            f"{need:,} tokens — lower --batch_size/--block_size or use more data")
        self.epoch, self.position = 0, 0  # epochs completed; batches served in this epoch
        self._order = None

    def _windows(self):
        """This rank's window indices for the current epoch, in visiting order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_windows, generator=generator)  # (n_windows,)
        return order[self.rank::self.world_size][: self.windows_per_epoch]

    def next_batch(self):
        if self._order is None:
            self._order = self._windows()
        i = self.position * self.batch_size
        starts = self._order[i:i + self.batch_size] * self.block_size  # (B,) token offsets
        batch = _gather(self.tokens, starts, self.block_size, self.device)
        self.position += 1
        if self.position == self.steps_per_epoch:  # roll over now, so epoch = epochs completed
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    __next__ = next_batch

    def __iter__(self):
        return self

    def state_dict(self):
        """Plain ints: enough to resume at exactly the next batch."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size,
                "world_size": self.world_size, "n_windows": self.n_windows}

    def load_state_dict(self, state):
        for key in ("block_size", "batch_size", "world_size", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"the saved data position has {key}={state[key]}, this run "
                                f"{getattr(self, key)} — resume with the same data, --batch_size, "
                                f"--block_size and process count, or start without --resume")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None


# =================================================================================================
# Command line
# =================================================================================================

def main(argv=None):
    parser = argparse.ArgumentParser(description="Download and tokenize a dataset into "
                                                 "data/<dataset>/<tokenizer>/{train,val}.bin.")
    parser.add_argument("--dataset", default="shakespeare",
                        help=f"{', '.join(DATASETS)}, all, a .txt/.jsonl file, a folder, or NAME "
                             f"for data/raw/NAME/")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="gpt2, cl100k_base, bpe (train our own), or a saved BPE file")
    parser.add_argument("--max_mb", type=float, default=None,
                        help="tokenize at most this many MB of training text (and a tenth of it "
                             "of validation text)")
    parser.add_argument("--num_proc", type=int, default=None,
                        help="parallel tokenizing workers (default: all cores)")
    parser.add_argument("--vocab_size", type=int, default=8192,
                        help="vocabulary size when --tokenizer bpe")
    parser.add_argument("--data_dir", default="data", help="where raw and prepared data live")
    args = parser.parse_args(argv)
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    try:
        for name in names:
            prepare(name, args.tokenizer, args.data_dir, max_mb=args.max_mb,
                    num_proc=args.num_proc, vocab_size=args.vocab_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
