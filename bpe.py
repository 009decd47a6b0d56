"""Lesson 3 — byte-pair encoding: how text becomes the integer ids a GPT reads.

What you will learn here, numbered as the section banners:
  1. split patterns: the regex that cuts text into pieces before any merging, clause by clause,
     and what it does to Chinese;
  2. the merge rule: inside a piece, keep joining the adjacent pair whose joined bytes has the
     lowest rank — tiktoken's whole encoder in one sentence, and why it replays training;
  3. training a vocabulary: merge the most frequent pair, again and again;
  4. the tokenizer: BPETokenizer — encode by the merge rule, special tokens, decode;
  5. the encoder the other lessons run (tiktoken over the very same ranks), which tokenizer a
     checkpoint holds, and decoding a stream of tokens without "�";
  6. the chat template: a conversation as one stream of ids, with <|im_start|> and <|im_end|>
     around each message, and the mask that says which ids are the assistant's;
  7. the report: what gpt2, cl100k_base and a vocabulary of our own do to Chinese.
Optional sections, for a second reading:
  8. (optional) training fast: the same merges, updating pair counts only where a merge happened;
  9. (optional) what every command line of the suite shares: one-line errors, flag checks,
     reading text strictly, writing files atomically, choosing a device, reading a checkpoint;
 10. (optional) the vocabulary file: a format a person can read;
 11. (optional) the command line.

You need: Python. Nothing of ours comes before this (gpt.py's vocab_size is what this file
decides). Imports: the standard library, `regex` (for \\p{L} and possessive quantifiers),
`tiktoken` (OpenAI's vocabularies, and the fast encoder), and torch in section 9 only.
Next lesson: data.py, which turns a corpus into a file of these ids.

    python bpe.py train FILE --vocab_size 4096 --out tokenizers/zh4096.bpe
    python bpe.py report FILE --vocab tokenizers/zh4096.bpe
"""
import argparse
import codecs
import contextlib
import heapq
import json
import os
import pathlib
import sys
import time
from collections import Counter, defaultdict
from itertools import chain

import regex
import tiktoken
import torch


# ----------------------------------------------------------------------------------------------
# 1. Split patterns
# ----------------------------------------------------------------------------------------------
# BPE never merges across the boundaries of the *pieces* a regex cuts the text into. That keeps
# tokens word-like (no token for "dog." next to "dog!" next to "dog?") and bounds the work per
# piece. Both patterns are tiktoken's, character for character, so we cut exactly where tiktoken
# cuts. `++`, `?+` and `*+` are *possessive*: once they have eaten characters they never give
# them back, which saves backtracking and changes no result here.

# GPT-2 (tiktoken's faster but equivalent form of the 2019 pattern), clause by clause:
#   '(?:[sdmt]|ll|ve|re)    the English endings 's 't 'm 'd 'll 've 're become their own piece;
#                           lower case only, so "DON'T" splits as DON / ' / T
#    ?\p{L}++               a run of letters with at most one leading space: " world"
#    ?\p{N}++               a run of digits, any length, with at most one leading space: " 2024"
#    ?[^\s\p{L}\p{N}]++     a run of anything else (punctuation, symbols, emoji): " (!)"
#   \s++$                   whitespace that runs to the end of the text
#   \s+(?!\S)               a run of whitespace minus its last character, which is left behind
#                           to become the leading space of the next word: "   x" -> "  " + " x"
#   \s                      any single whitespace character still left
# Chinese: Han characters are letters (\p{L}, category Lo), so "天气很好" is one piece, but the
# full-width comma "，" is punctuation and becomes a piece of its own.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# GPT-4 (cl100k_base), clause by clause:
#   '(?i:[sdmt]|ll|ve|re)       the same contractions, now in any case: "DON'T" -> DON / 'T
#   [^\r\n\p{L}\p{N}]?+\p{L}++  a run of letters with one optional leading character that is not
#                               a letter, digit or newline — a space, but also "(" or "，"
#   \p{N}{1,3}+                 digits in groups of at most three: "123456" -> 123 / 456, so the
#                               vocabulary needs only 1,110 number tokens
#    ?[^\s\p{L}\p{N}]++[\r\n]*+ punctuation with an optional leading space, taking the newlines
#                               that follow it: ";\n" is one piece
#   \s++$                       whitespace at the end of the text
#   \s*[\r\n]                   whitespace that ends in a newline: "    \n" (trailing spaces) is
#                               one piece, and indentation never swallows the line break
#   \s+(?!\S) and \s            as in GPT-2
# Chinese: "我们今天去北京，天气很好。" becomes "我们今天去北京" / "，天气很好" / "。": a whole run of
# Han characters is ONE piece (with the comma in front of it), because nothing in a Han run is a
# space or punctuation. A Chinese sentence can be one piece of hundreds of bytes.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# The special token that separates documents: data.py puts it after every document, sample.py
# starts an empty prompt from it and stops when the model writes it. The chat template's two
# (section 6) open and close each message of a conversation.
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# ----------------------------------------------------------------------------------------------
# 2. The merge rule
# ----------------------------------------------------------------------------------------------
# A vocabulary is `ranks`: token bytes -> id. In a vocabulary produced by BPE training the id is
# also the *time of birth*: the 256 single bytes come first, then token 256 was the first merge,
# 257 the second, and so on. tiktoken's rule for one piece (a bytes string) is:
#
#     start from single bytes; repeatedly merge the adjacent pair whose joined bytes has the
#     lowest rank (leftmost on a tie); stop when no adjacent pair joins into a known token.
#
# Why this equals replaying the training merges in order ("apply merge 0 everywhere, then merge
# 1, ..."): a token is always born after the parts it is made of, so joining a part with its
# neighbour gives a token with a *higher* rank than the part. Suppose the lowest mergeable pair
# now has rank r. Could a merge of rank < r still be due? Its two parts would have to be
# adjacent now (they are not: r is the lowest), or one of them would have to be created later —
# but everything created from now on has rank ≥ r. So merges happen in increasing rank, each as
# soon as its pair exists: exactly the replay. (Where a vocabulary can build the same bytes two
# ways — training may merge into a token that exists already, section 3 — the rank rule is simply
# the definition: tiktoken's, and ours.)
#
# Why gpt2's and cl100k's single-byte ids are not the byte values: GPT-2 stored its vocabulary as
# JSON text and mapped each byte to a printable character first, listing the 188 printable bytes
# ('!' .. '~', '¡' .. '¬', '®' .. 'ÿ') before the 68 others (controls, space, ...). So '!' (0x21)
# is id 0, 'A' is 32, byte 0x00 is 188 and the space (0x20) is 220; cl100k kept that order for
# its first 256 ranks. Single bytes are never the *result* of a merge, so their ranks are never
# compared: for them an id is just a name. Our trained vocabularies use id = byte value.

def merge_piece(piece, ranks):
    """The merge rule, written out: bytes of one piece → its token ids.

    `parts` are the current tokens; `pair_ranks[i]` is the rank of parts[i] + parts[i+1] (or
    `missing` if that is not a token). Each merge costs O(n), so a piece costs O(n²): quick for
    the short pieces of ordinary text, slow for a Han run of thousands of characters — which is
    one reason the other lessons encode with tiktoken over the same ranks.
    """
    missing = 1 << 62                                            # larger than any rank
    parts = [piece[i:i + 1] for i in range(len(piece))]
    pair_ranks = [ranks.get(piece[i:i + 2], missing) for i in range(len(piece) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == missing:
            break                                                # no adjacent pair is a token
        i = pair_ranks.index(best)                               # the leftmost lowest, as tiktoken
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i > 0:                                                # the pair on the left now ends
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], missing)   # with the new token
        if i < len(pair_ranks):                                  # the pair on the right starts
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], missing)       # with it
    return [ranks[p] for p in parts]


def encode_piece(piece, ranks):
    """Token ids of one piece (bytes): the piece itself if it is a token, else the merge rule.

    tiktoken looks the whole piece up first, and so must we: the merge path does not always end
    in the whole piece even when the piece is a token.
    """
    rank = ranks.get(piece)
    return [rank] if rank is not None else merge_piece(piece, ranks)


# ----------------------------------------------------------------------------------------------
# 3. Training a vocabulary
# ----------------------------------------------------------------------------------------------
# Exact BPE: the training text is cut into pieces by the split pattern, each piece a list of byte
# values; each step merges the adjacent pair (a, b) that occurs most often, summed over all
# pieces, and every occurrence is replaced, left to right, by one new token. Overlaps count as
# plain adjacent positions: "aaa" holds the pair (a, a) twice, and merging it gives [aa, a].
# Ties: the most frequent pair wins; among equally frequent pairs the smallest (a, b) in id order.
# train_naive below is this rule as plain code; train_fast (section 8) follows the same rule with
# far less work, so the two produce the same merges (a test checks).
#
# If the joined bytes of the winning pair already are a token (built earlier from another split,
# e.g. "ab"+"c" and then "a"+"bc"), the pair is merged into that existing token and no new id is
# spent — ids stay dense and each byte string has one id, which `ranks` (keyed by bytes) needs.

def count_pieces(text, pattern, special_tokens=()):
    """Distinct pieces with their multiplicities: {piece bytes: count}.

    Special tokens are cut out first and never learned from. Counting once means a piece seen a
    million times ("，" or " the") costs the trainer one list, not a million.
    """
    segments = [text]
    if special_tokens:
        specials = "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        segments = regex.split(specials, text)
    split = regex.compile(pattern)
    counts = Counter()
    for segment in segments:
        counts.update(split.findall(segment))
    return {piece.encode("utf-8"): c for piece, c in counts.items()}


def merge_pair(ids, a, b, new):
    """Replace each occurrence of the pair (a, b) in ids, left to right, by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def new_token(vocab, index, a, b):
    """Id for the bytes vocab[a] + vocab[b]: the existing one, or a newly appended token."""
    token = vocab[a] + vocab[b]
    if token not in index:
        index[token] = len(vocab)
        vocab.append(token)
    return index[token]


def train_naive(piece_counts, num_merges):
    """The readable reference trainer: recount every pair from scratch before each merge.

    Returns (merges, vocab): merges is a list of ((a, b), new_id) in order, vocab the list of
    token bytes by id. Cost per merge: the length of the whole corpus — fine for a lesson, and
    for checking the fast trainer, far too slow for real text.
    """
    pieces = [(list(piece), count) for piece, count in piece_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    merges = []
    while len(vocab) < 256 + num_merges:
        stats = Counter()
        for ids, count in pieces:
            for pair in zip(ids, ids[1:]):
                stats[pair] += count
        if not stats:
            break                                                # every piece is one token
        a, b = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new = new_token(vocab, index, a, b)
        merges.append(((a, b), new))
        pieces = [(merge_pair(ids, a, b, new), count) for ids, count in pieces]
    return merges, vocab


# ----------------------------------------------------------------------------------------------
# 4. The tokenizer
# ----------------------------------------------------------------------------------------------

class BPETokenizer:
    """A byte-level BPE tokenizer: `ranks` (token bytes -> id), a split pattern, special tokens.

    Special tokens (e.g. "<|endoftext|>") are strings with ids of their own that no merge can
    produce; they live outside `ranks`. tiktoken's semantics: `encode` refuses text that spells a
    special token unless you allow it (a document could otherwise forge an end-of-text), and
    `encode_ordinary` treats such text as plain characters.
    """

    def __init__(self, ranks, pattern, special_tokens=None, name="bpe"):
        self.ranks = dict(ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self.split = regex.compile(pattern)
        self.decoder = {i: t for t, i in self.ranks.items()}     # id -> bytes
        self.decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.n_vocab = max(self.decoder) + 1                      # what an embedding table needs

    def __eq__(self, other):
        """Two tokenizers are the same when they encode alike; the name is only a label."""
        return isinstance(other, BPETokenizer) and (
            (self.ranks, self.pattern, self.special_tokens)
            == (other.ranks, other.pattern, other.special_tokens))

    @property
    def eot_token(self):
        """Id of <|endoftext|>, the document separator."""
        return self.special_tokens[ENDOFTEXT]

    @classmethod
    def from_tiktoken(cls, name):
        """OpenAI's vocabulary `name` ("gpt2", "cl100k_base") via tiktoken's own loaders.

        Works offline when TIKTOKEN_CACHE_DIR holds the downloaded files.
        """
        from tiktoken_ext import openai_public
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
        return cls(spec["mergeable_ranks"], spec["pat_str"], spec["special_tokens"], name=name)

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT4_SPLIT_PATTERN, special_tokens=None,
              name="bpe", progress=None):
        """Learn a vocabulary of exactly `vocab_size` ids from `text` (fewer only if the text runs
        out of pairs).

        Ids 0..255 are the byte values, then one id per new token a merge makes, then the special
        tokens — by default <|endoftext|>, <|im_start|> and <|im_end|> (section 6: the chat
        template), which therefore get the last three ids. `progress`, if given, is called after
        each merge as progress(step, total, token_bytes, count).
        """
        specials = [ENDOFTEXT, IM_START, IM_END] if special_tokens is None else list(special_tokens)
        assert vocab_size >= 256 + len(specials), (
            "vocab_size must hold the 256 bytes and the specials")
        piece_counts = count_pieces(text, pattern, specials)
        # train_fast (section 8) makes the same merges as train_naive, thousands of times sooner
        _, vocab = train_fast(piece_counts, vocab_size - 256 - len(specials), progress)
        ranks = {token: i for i, token in enumerate(vocab)}
        special_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
        return cls(ranks, pattern, special_ids, name=name)

    # -- encoding -------------------------------------------------------------------------------

    def encode_ordinary(self, text):
        """Ids of `text`: split it into pieces, encode each; special-token text is plain text."""
        # Lone surrogates (possible in a Python str) have no UTF-8 form; tiktoken replaces them
        # with U+FFFD, and so do we.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = []
        for piece in self.split.findall(text):
            ids += encode_piece(piece.encode("utf-8"), self.ranks)
        return ids

    def special_regex(self, tokens):
        """A regex matching any of `tokens`, longest first: "<|a|>b" is not cut short by "<|a|>"."""
        alternatives = sorted(tokens, key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Ids of `text`, with tiktoken's special-token rules.

        allowed_special: set of special tokens to encode as their id, or "all".
        disallowed_special: set of special tokens whose appearance is an error, or "all" (every
        special token not allowed). Raises ValueError naming the token when one appears.
        """
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
        if disallowed:
            found = self.special_regex(disallowed).search(text)
            if found:
                raise ValueError(f"text contains the special token {found.group()!r}, which is "
                                 f"disallowed: pass allowed_special={{{found.group()!r}}} "
                                 f"(or 'all') to encode it as that token, or "
                                 f"disallowed_special=() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        # split with one group gives [text, special, text, special, ..., text]
        for k, part in enumerate(self.special_regex(allowed).split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self.encode_ordinary(part)
        return ids

    # -- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes the ids stand for, concatenated."""
        return b"".join(self.decoder[i] for i in ids)

    def decode(self, ids, errors="replace"):
        """The text the ids stand for. A token may hold part of a UTF-8 character (GPT-2 spends
        two or three tokens on many Han characters), so a cut sequence can end mid-character:
        errors="replace" shows that as U+FFFD instead of failing."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- keeping it: a file (the format is section 10), or plain data for a checkpoint -----------

    def save(self, path):
        """Write the vocabulary as a plain-text file a person can read."""
        write_tokenizer_file(self, path)

    @classmethod
    def load(cls, path):
        """Read a file written by save(); anything else is an InputError that says so."""
        return read_tokenizer_file(path, cls)

    def to_dict(self):
        """Plain Python types only (str, int, list, dict), so a checkpoint holding it loads with
        torch.load(weights_only=True). Tokens are hex strings, listed in id order."""
        tokens = sorted(self.ranks, key=self.ranks.get)
        return {"name": self.name, "pattern": self.pattern,
                "special_tokens": dict(self.special_tokens),
                "tokens": [token.hex() for token in tokens]}

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict()."""
        ranks = {bytes.fromhex(h): i for i, h in enumerate(d["tokens"])}
        return cls(ranks, d["pattern"], d["special_tokens"], name=d["name"])


# ----------------------------------------------------------------------------------------------
# 5. The encoder the other lessons run, a tokenizer's identity, and decoding a stream
# ----------------------------------------------------------------------------------------------
# The other lessons never encode with BPETokenizer: tiktoken applies the same split pattern and
# the same lowest-rank rule in Rust, several times faster than the plain loop on one core, and
# on every core at once.
# So a "tokenizer" there is one of two things: the name of an OpenAI vocabulary, or a
# BPETokenizer of ours; get_tokenizer turns either into a tiktoken.Encoding with identical ids
# (the tests check them token for token). Users name tokenizers on command lines, so this is
# where the lesson first meets a mistake of theirs: an InputError, which every command line
# prints as one line that names the fix, never as a traceback.

TIKTOKEN_NAMES = ("gpt2", "cl100k_base")  # OpenAI vocabularies we use by name


class InputError(ValueError):
    """A mistake in what the user gave us — a file, a flag, a folder, the network — said in one
    line that names the fix."""


def load_tokenizer(spec):
    """--tokenizer's value → a tokenizer: a name in TIKTOKEN_NAMES stays that name; the path of
    a saved BPE becomes that BPETokenizer."""
    if spec in TIKTOKEN_NAMES:
        return spec
    if pathlib.Path(spec).is_file():
        return BPETokenizer.load(spec)
    raise InputError(f"unknown tokenizer {spec!r} — use {' or '.join(TIKTOKEN_NAMES)}, or the path "
                     f"of a file written by: python bpe.py train FILE --vocab_size N --out PATH")


def get_tokenizer(tokenizer):
    """A `tiktoken.Encoding` for a tokenizer: a name or path (as load_tokenizer takes), a
    BPETokenizer, or a checkpoint's tokenizer entry (below). Same ids as BPETokenizer."""
    if isinstance(tokenizer, dict):
        tokenizer = tokenizer_from_entry(tokenizer)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tokenizer, BPETokenizer):
        return tiktoken.Encoding(name=tokenizer.name, pat_str=tokenizer.pattern,
                                 mergeable_ranks=tokenizer.ranks,
                                 special_tokens=tokenizer.special_tokens)
    try:
        return tiktoken.get_encoding(tokenizer)
    except Exception as e:                   # tiktoken downloads its files on first use
        raise InputError(f"cannot load tiktoken's {tokenizer} vocabulary ({type(e).__name__}) — "
                         f"offline, set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


# A checkpoint must say which tokenizer its ids belong to: the same ids under another vocabulary
# are gibberish. Both sides of that entry live here, side by side. An OpenAI vocabulary travels
# by name; ours travels whole (its tokens, pattern and special tokens), so a checkpoint still
# samples correctly after the data folder it was trained from is gone.

def tokenizer_entry(tokenizer):
    """Write side: a tokenizer (name or BPETokenizer) → the plain dict a checkpoint stores."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.to_dict()
    return {"name": tokenizer}


def tokenizer_from_entry(entry):
    """Read side: a checkpoint's tokenizer entry → the tokenizer (name or BPETokenizer)."""
    return BPETokenizer.from_dict(entry) if "tokens" in entry else entry["name"]


# Decoding one token at a time. A token is a run of *bytes*, and merges follow byte-pair
# frequency, not character boundaries: a Han character is 3 UTF-8 bytes, an emoji 4, and a
# vocabulary often has no token for them. Real cases:
#   cl100k_base, "人工智能" → 人 | 工 | b"\xe6\x99" | b"\xba" | 能     (智 = E6 99 BA is split)
#   gpt2,        "😀"       → b"\xf0\x9f\x98" | b"\x80"
# Decoding each token on its own meets b"\xe6\x99" — the start of a character, not a character —
# and can only print "�"; then b"\xba" alone is invalid too and prints a second "�". The fix is
# to decode the *stream of bytes*: Python's incremental UTF-8 decoder returns the characters that
# are complete so far and keeps the unfinished tail (at most 3 bytes) for the next call. Only a
# truly invalid sequence becomes "�", and at the end final=True flushes what is left. The pieces
# joined equal decoding all the tokens at once, exactly.

def decode_stream(enc, token_ids):
    """Token ids, one at a time → text pieces, each made only of whole characters.

    enc: a tiktoken.Encoding. An id with no bytes adds nothing: cl100k_base has 16 such holes
    (100256 and 100261–100275, section 7), and a model with its 100,277 rows can sample them.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in token_ids:
        try:
            token = enc.decode_single_token_bytes(int(token_id))
        except KeyError:
            token = b""
        piece = decoder.decode(token)
        if piece:  # empty while a character is incomplete
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


# ----------------------------------------------------------------------------------------------
# 6. The chat template
# ----------------------------------------------------------------------------------------------
# A chat model is the same GPT trained on conversations written out as one text. ChatML (the
# template of Qwen, MiniMind and happy-llm) wraps each message in two special tokens:
#
#     <|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n
#     <|im_start|>user\n「相濡以沫」是什么意思？<|im_end|>\n
#     <|im_start|>assistant\n比喻同在困境，相互救助。<|im_end|>\n
#
# The model learns to write the assistant's turns — and <|im_end|> when a turn is over, which is
# how a chat program knows the answer is complete. It should not learn to write the user's
# messages: those come from the person. So next to the ids goes a mask, 1 exactly on the
# assistant's content and its closing <|im_end|>, 0 elsewhere; the loss counts the targets where
# the mask is 1 (data.py turns the rest into −1, which gpt.py's loss ignores). To answer, a chat
# program renders the conversation so far and adds "<|im_start|>assistant\n": the model goes on
# from there, and stops at <|im_end|>.
#
# The two tokens must be single ids, never spelled out from "<", "|", …: a user typing
# "<|im_end|>" must not end a turn, so text is always encoded with encode_ordinary, and the
# special ids are put in by hand. Our BPE reserves them from the start (BPETokenizer.train);
# with_chat_tokens gives them to a tokenizer that lacks them (gpt2, cl100k_base, an older BPE of
# ours) as two new ids after its last, and the model then grows two embedding rows for them
# (gpt.py, GPT.grow_vocab).

ROLES = ("system", "user", "assistant")


def with_chat_tokens(tokenizer):
    """A BPETokenizer holding <|im_start|> and <|im_end|>: `tokenizer` itself if it has them
    already, else the same vocabulary with the missing ones as new ids after its last."""
    if tokenizer in TIKTOKEN_NAMES:                      # OpenAI's, as a BPETokenizer we can extend
        tokenizer = BPETokenizer.from_tiktoken(tokenizer)
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    added = {t: tokenizer.n_vocab + k for k, t in enumerate(missing)}
    return BPETokenizer(tokenizer.ranks, tokenizer.pattern, {**tokenizer.special_tokens, **added},
                        name=f"{tokenizer.name}-chat")


def render_chat(messages, enc, reply=False):
    """A conversation — [{"role": "system" | "user" | "assistant", "content": str}, …] — as
    (ids, mask) in ChatML; mask 1 exactly on each assistant message's content and its <|im_end|>.
    reply=True appends "<|im_start|>assistant\n": the prompt for the next answer.

    enc: a tiktoken Encoding with both chat tokens (get_tokenizer of a with_chat_tokens result).
    """
    start, end = enc.encode_single_token(IM_START), enc.encode_single_token(IM_END)
    newline = enc.encode_ordinary("\n")
    ids, mask = [], []
    for message in messages:
        head = [start] + enc.encode_ordinary(message["role"] + "\n")    # <|im_start|>role\n
        body = enc.encode_ordinary(message["content"]) + [end]          # content<|im_end|>
        learn = int(message["role"] == "assistant")
        ids += head + body + newline
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(newline)
    if reply:
        head = [start] + enc.encode_ordinary("assistant\n")
        ids, mask = ids + head, mask + [0] * len(head)
    return ids, mask


# ----------------------------------------------------------------------------------------------
# 7. Report: what each vocabulary does to a text
# ----------------------------------------------------------------------------------------------
# GPT-2 saw little Chinese when its merges were learned, so most Han characters are not tokens:
# each costs two or three tokens, and most of its tokens on Chinese are fragments of a character.
# A model that writes one token at a time then prints "�" whenever a character is cut (unless
# decoded as a stream, above), and its context window holds half as many characters. cl100k is
# better but still spends 95 % of its 100k table on ASCII tokens, mostly English, that a
# Chinese model seldom needs. The report makes both visible: chars/token, bytes/token and the
# fragment share.

def partial_token_ids(enc):
    """Ids whose bytes are not whole UTF-8 characters (e.g. 2 of the 3 bytes of a Han char)."""
    partial = set()
    for i in range(enc.n_vocab):
        try:
            enc.decode_single_token_bytes(i).decode("utf-8")
        except KeyError:
            continue                                             # a hole in the id space
        except UnicodeDecodeError:
            partial.add(i)
    return partial


def token_report(text, encodings):
    """Markdown table: tokens, chars/token, bytes/token and the share of broken-character tokens
    for each (label, tiktoken.Encoding)."""
    n_chars, n_bytes = len(text), len(text.encode("utf-8"))
    rows = ["| tokenizer | vocab | tokens | chars/token | bytes/token "
            "| tokens not whole UTF-8 chars |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, enc in encodings:
        ids = enc.encode_ordinary(text)
        partial = partial_token_ids(enc)
        n_partial = sum(1 for i in ids if i in partial)
        n = max(len(ids), 1)
        rows.append(f"| {label} | {enc.n_vocab:,} | {len(ids):,} | {n_chars / n:.2f} | "
                    f"{n_bytes / n:.2f} | {100 * n_partial / n:.1f}% |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# 8. (optional) Training fast
# ----------------------------------------------------------------------------------------------
# What it adds: train_naive's merges, with work proportional to what each merge changes — 5 MB
# to 4,096 tokens in about 9 s instead of hours. Merging (a, b) changes only the pairs that touch
# an occurrence: in "… x a b y …" the pairs (x, a) and (b, y) disappear and (x, new), (new, y)
# are born. So we keep the counts, and for each merge visit only the pieces that hold the pair.

def merge_in_piece(ids, a, b, new, stats, count):
    """Merge (a, b) -> new inside one piece, in place; return the pairs born there.

    The pairs an occurrence destroys are taken off `stats` right here, `count` times (how often
    the piece occurs); the pairs it creates are returned, for the caller to count and index.
    (a, b) itself is left to the caller. Two occurrences can touch ("x a b a b y"): then the
    left one's right-hand pair (b, a) is the right one's left-hand pair, and only the right one
    accounts for it — as (new, new).
    """
    born, k, last, n = [], 0, -2, len(ids)
    unseen = ids.count(a)                                        # `a`s still to look at
    while unseen:
        k = ids.index(a, k)
        unseen -= 1
        if k + 1 == n or ids[k + 1] != b:
            k += 1
            continue
        if a == b:
            unseen -= 1                                          # the `b` we swallow was an `a`
        if k:                                                    # the pair on the left:
            left = ids[k - 1]  # (left, a) is lost, (left, new) born.
            # But if an occurrence ended just before (at k − 1), ids[k − 1] is already `new`, and
            # the pair lost is the one the text held before that merge: (b, a).
            stats[b if last == k - 1 else left, a] -= count
            born.append((left, new))
        if k + 2 < n:                                            # the pair on the right, unless
            y = ids[k + 2]                                       # the next occurrence starts there
            if y != a or k + 3 == n or ids[k + 3] != b:
                stats[b, y] -= count
                born.append((new, y))
        ids[k] = new
        del ids[k + 1]
        n -= 1
        last = k
        k += 1
    return born


def count_pairs(pieces, counts):
    """Initial pair counts (with multiplicity) and, per pair, the pieces that hold it."""
    once = (zip(ids, ids[1:]) for ids, count in zip(pieces, counts) if count == 1)
    stats = Counter(chain.from_iterable(once))  # the bulk of the counting runs in C
    for ids, count in zip(pieces, counts):
        if count > 1:
            for pair in zip(ids, ids[1:]):
                stats[pair] += count
    where = defaultdict(set)
    for i, ids in enumerate(pieces):
        for pair in zip(ids, ids[1:]):
            where[pair].add(i)
    return defaultdict(int, stats), where


def train_fast(piece_counts, num_merges, progress=None):
    """The same merges as train_naive, with work proportional to what each merge changes.

    State: `pieces[i]` (ids of distinct piece i) and `counts[i]`; `stats[pair]` = occurrences
    summed over pieces with multiplicity; `where[pair]` = pieces that may hold the pair (a piece
    that lost it is simply found empty-handed); a heap of (−count, a, b), whose smallest entry is
    the most frequent pair, ties to the smallest (a, b) — the documented rule.
    Heap entries are never updated in place: counts that grow (pairs born in a merge) are pushed
    at once; counts that shrink are fixed when their entry surfaces (pushed again with the true
    count). So every pair has an entry at least as high as its true priority, and the first
    popped entry that is still exact is the true most frequent pair.
    `progress(tokens made, num_merges, token_bytes, count)` is called after each merge if given.
    """
    pieces = [list(piece) for piece in piece_counts]
    counts = list(piece_counts.values())
    stats, where = count_pairs(pieces, counts)
    heap = [(-c, a, b) for (a, b), c in stats.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    merges = []
    while len(vocab) < 256 + num_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        true_count = stats.get((a, b), 0)
        if true_count != -neg_count:                             # a stale entry
            if 0 < true_count < -neg_count:
                heapq.heappush(heap, (-true_count, a, b))        # it shrank: file it again
            continue
        new = new_token(vocab, index, a, b)
        merges.append(((a, b), new))
        born = defaultdict(int)                                  # pairs with the new token
        for i in where.pop((a, b)):
            count = counts[i]
            for pair in merge_in_piece(pieces[i], a, b, new, stats, count):
                born[pair] += count
                where[pair].add(i)
        del stats[a, b]                                          # every occurrence is gone
        for pair, count in born.items():
            stats[pair] += count
            heapq.heappush(heap, (-stats[pair], pair[0], pair[1]))
        if progress is not None:
            progress(len(vocab) - 256, num_merges, vocab[new], -neg_count)   # tokens made
    return merges, vocab


# ----------------------------------------------------------------------------------------------
# 9. (optional) What every command line of the suite shares
# ----------------------------------------------------------------------------------------------
# What it adds: bpe.py, data.py, train.py and sample.py check flags, read text, write files and
# report a mistake (an InputError) the same way — one line naming the fix, never a traceback, and
# never a file left half-written — so each of those rules lives here, once.

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a wrong flag said in one line (not the whole usage), exit 2, and with no
    abbreviations: --init would otherwise mean --init_from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message} (see: python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number_flag(kind, rule, ok):
    """An argparse `type=`: text → a number of `kind` for which ok(number) holds, else an error
    naming `rule`. NaN fails every comparison, so it is refused too."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    return parse


VOCAB_SIZE_FLAG = number_flag(int, "≥ 259 (256 byte tokens + 3 special tokens)", lambda n: n >= 259)
MAX_MB_FLAG = number_flag(float, "> 0", lambda mb: mb > 0)


def folder_flag(text):
    """An argparse `type=` for a folder: an empty one (an unset shell variable?) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?) — give a folder")
    return text


def run_command(main, argv=None):
    """main(argv) → an exit code: an InputError is one line `error: ...` and 1; Ctrl-C is 130;
    a closed pipe (`... | head`) ends quietly (stdout to /dev/null, for Python's last flush)."""
    try:
        return main(argv) or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def read_text(path, max_mb=None):
    """A UTF-8 file's text, strictly (a bad byte is an error naming iconv), without the U+FEFF
    that Windows editors put first; max_mb reads only the first max_mb·10⁶ bytes."""
    if not pathlib.Path(path).is_file():
        raise InputError(f"no file at {path} — pass the path of a UTF-8 text file")
    with open(path, "rb") as f:
        data = f.read(-1 if max_mb is None else int(max_mb * 1e6))
    try:   # incremental: a last character cut by max_mb is held back; any other bad byte fails
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=max_mb is None)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}) "
                         f"— convert it: iconv -f GB18030 -t UTF-8 {path} > "
                         f"{pathlib.Path(path).stem}.utf8.txt") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InputError(f"{path} holds no text{' in its first --max_mb' if max_mb else ''}")
    return text


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path` (holding the process id, so no two processes share it),
    os.replace'd onto `path` when the block succeeds — atomic: `path` is the old file or the
    whole new one, never half — and removed when it fails."""
    temp = pathlib.Path(path).with_name(f".{pathlib.Path(path).name}.{os.getpid()}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def make_writable_folder(folder, flag):
    """mkdir -p `folder` and prove it writable before any long work (a folder can refuse writes,
    and a path on the way can be a file); the error names the flag to change."""
    probe = pathlib.Path(folder) / f".write_test.{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}) — "
                         f"choose another {flag}") from None


TRAIN_HINT = "python train.py --model_type gpt-micro --dataset chinese"


def device_flag(name):
    """An argparse `type=` for --device: auto, or a device torch can use here — a typo or a missing
    GPU is one line now, not a traceback later."""
    if name != "auto":
        try:
            torch.empty(0, device=name)          # torch itself says whether the device is usable
        except (RuntimeError, AssertionError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:57]
            raise argparse.ArgumentTypeError(
                f"{name} is not a device torch can use here ({reason}) — use auto, cpu, cuda, "
                f"cuda:N or mps") from None
    return name


def pick_device(name="auto"):
    """'auto' → an NVIDIA GPU (cuda), then Apple's (mps), then the CPU; other names as they are."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def read_checkpoint(path, need=("model", "model_config", "tokenizer")):
    """A checkpoint file → its dict, by torch.load(weights_only=True): tensors and plain data only.
    A full pickle can run any code while loading, so a checkpoint from a stranger could take over
    the machine; weights_only refuses that. Every way it can fail is one line."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a run folder — give a checkpoint in it, "
                         f"e.g. {path / 'best_model.pt'}")
    if not path.is_file():
        raise InputError(f"no checkpoint at {path} — train one with: {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # not torch.save's zip, cut short, or holding pickled classes
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        raise InputError(f"{path} is not a whole checkpoint written by train.py ({reason}) — "
                         f"was it being saved when the run stopped? Give another, e.g. "
                         f"last.pt") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path} is not a checkpoint of this project "
                         f"(it lacks: {', '.join(missing)})")
    return ckpt


# ----------------------------------------------------------------------------------------------
# 10. (optional) The vocabulary file
# ----------------------------------------------------------------------------------------------
# What it adds: a vocabulary saved as text a person can read and check — a header, then one token
# per line as `id <tab> bytes in hex <tab> the bytes shown as a Python string` (only id and hex
# are read back). data.py keeps each BPE next to the token files it wrote, in this form.

FILE_FORMAT = "bpe-tokenizer-1"                                  # the header line of saved files


def readable(token):
    """Token bytes for human eyes: text where they are whole characters, \\xNN for the rest
    (half a Han character), escapes for invisible characters, in quotes so spaces show."""
    text = token.decode("utf-8", errors="backslashreplace")
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


def write_tokenizer_file(tokenizer, path):
    """BPETokenizer.save: the header, then every token in id order, written atomically."""
    lines = [
        "# bpe.py tokenizer: one token per line: id, bytes as hex, readable form",
        f"format: {FILE_FORMAT}",
        f"name: {json.dumps(tokenizer.name, ensure_ascii=False)}",
        f"pattern: {json.dumps(tokenizer.pattern, ensure_ascii=False)}",
        f"special_tokens: {json.dumps(tokenizer.special_tokens, ensure_ascii=False)}",
        f"tokens: {len(tokenizer.ranks)}",
        "---",
    ]
    for token, i in sorted(tokenizer.ranks.items(), key=lambda item: item[1]):
        lines.append(f"{i}\t{token.hex()}\t{readable(token)}")
    with atomic_path(path) as temp:
        temp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_tokenizer_file(path, cls):
    """BPETokenizer.load: parse what write_tokenizer_file wrote; anything else is an InputError."""
    try:
        header_text, sep, body = pathlib.Path(path).read_text(encoding="utf-8").partition("\n---\n")
        header = dict(line.split(": ", 1) for line in header_text.splitlines()
                      if ": " in line and not line.startswith("#"))
        ranks = {}
        for line in body.splitlines():
            i, hex_bytes, _ = line.split("\t", 2)
            ranks[bytes.fromhex(hex_bytes)] = int(i)
        if sep and header.get("format") == FILE_FORMAT and len(ranks) == int(header["tokens"]):
            return cls(ranks, json.loads(header["pattern"]), json.loads(header["special_tokens"]),
                       name=json.loads(header["name"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError):
        pass                                                     # unreadable, or not ours
    raise InputError(f"{path} is not a tokenizer file written by bpe.py — make one with: "
                     f"python bpe.py train FILE --vocab_size 4096 --out PATH")


# ----------------------------------------------------------------------------------------------
# 11. (optional) Command line
# ----------------------------------------------------------------------------------------------
# What it adds: `python bpe.py train` learns a vocabulary from a file and saves it; `python bpe.py
# report` prints the table of section 7 for gpt2, cl100k_base and your vocabularies.

def train_command(args):
    text = read_text(args.file, args.max_mb)
    if pathlib.Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a folder — give the path of a file, "
                         f"e.g. {args.out}/vocab.bpe")
    make_writable_folder(pathlib.Path(args.out).parent, "--out")
    pattern = GPT4_SPLIT_PATTERN if args.pattern == "gpt4" else GPT2_SPLIT_PATTERN
    t0 = time.time()
    every = max(1, (args.vocab_size - 259) // 20)

    def progress(step, total, token, count):
        if step % every == 0 or step == total:
            print(f"merge {step:>6}/{total}  {readable(token):<24} count {count:>9,}  "
                  f"{time.time() - t0:6.1f}s", file=sys.stderr)

    tok = BPETokenizer.train(text, args.vocab_size, pattern=pattern,
                             name=pathlib.Path(args.out).stem, progress=progress)
    tok.save(args.out)
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')):,} bytes in "
          f"{time.time() - t0:.1f}s -> {args.out}")


def report_command(args):
    text = read_text(args.file, args.max_mb)
    encodings = [(name, get_tokenizer(name)) for name in TIKTOKEN_NAMES]
    for path in args.vocab or []:
        if not pathlib.Path(path).is_file():
            raise InputError(f"no vocabulary at {path} — make one with: python bpe.py train FILE "
                             f"--vocab_size 4096 --out {path}")
        encodings.append((pathlib.Path(path).name, get_tokenizer(BPETokenizer.load(path))))
    print(token_report(text, encodings))


def main(argv=None):
    parser = ArgumentParser(prog="bpe.py", description="Train byte-level BPE vocabularies and "
                                                       "compare tokenizers on a text.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="learn a vocabulary from a UTF-8 text file")
    p.add_argument("file", help="UTF-8 text to learn from")
    p.add_argument("--vocab_size", type=VOCAB_SIZE_FLAG, required=True,
                   help="total ids, counting 256 bytes and 3 special tokens (at least 259)")
    p.add_argument("--out", required=True, help="where to write the vocabulary (plain text)")
    p.add_argument("--pattern", choices=["gpt4", "gpt2"], default="gpt4",
                   help="split pattern: gpt4 (cl100k, default) or gpt2")
    p.add_argument("--max_mb", type=MAX_MB_FLAG,
                   help="use only the first N MB")
    p.set_defaults(run=train_command)
    p = sub.add_parser("report", help="markdown table of token counts for gpt2, cl100k_base "
                                      "and your vocabularies")
    p.add_argument("file", help="UTF-8 text to measure")
    p.add_argument("--vocab", action="append", help="a vocabulary file from `train` (repeatable)")
    p.add_argument("--max_mb", type=MAX_MB_FLAG,
                   help="use only the first N MB")
    p.set_defaults(run=report_command)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(run_command(main))
