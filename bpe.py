"""Lesson 3: byte-pair encoding (BPE), built from nothing and checked against OpenAI's tokenizers.

What you learn here
    * How text becomes the integer ids a GPT reads: UTF-8 bytes, a split regex, and merges.
    * The one rule behind tiktoken's encoder — "inside each piece, keep merging the adjacent pair
      whose joined bytes has the lowest rank" — and why it reproduces the order of training.
    * How to *train* a vocabulary exactly (most frequent pair first) and still fast: count each
      distinct pre-token once, and update pair counts only where a merge happened.
    * Why Chinese comes out expensive (and sometimes as broken half-characters) with GPT-2's
      vocabulary, and why a small vocabulary of our own suits a tiny model: with 100k tokens and
      a 128-wide model the embedding table alone holds 12.8M parameters.

What you need from before
    Nothing from gpt.py: a tokenizer is plain Python. (gpt.py's `vocab_size` is what this file
    decides.) Imports: the standard library, `regex` (for \\p{L} and possessive quantifiers) and
    `tiktoken` (to load OpenAI's vocabularies and to be the fast encoder).

Read next: data.py, which turns a corpus into a file of these ids.

Command line
    python bpe.py train FILE --vocab_size 4096 --out tokenizers/zh4096.bpe
    python bpe.py report FILE --vocab tokenizers/zh4096.bpe
"""
import argparse
import heapq
import json
import pathlib
import sys
import time
from collections import Counter, defaultdict
from itertools import chain

import regex
import tiktoken

# ----------------------------------------------------------------------------------------------
# 1. Split patterns
#
# BPE never merges across the boundaries of the pieces that a regex cuts the text into. That
# keeps tokens "word-like" (no token for "dog." next to "dog!" next to "dog?") and bounds the work
# per piece. Both patterns are tiktoken's, character for character, so that we cut exactly where
# tiktoken cuts. `++`, `?+` and `*+` are *possessive*: once they have eaten characters they never
# give them back, which saves backtracking and does not change any result here.

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
# Han characters is ONE piece (with the comma in front of it), because nothing in a Han run is
# a space or punctuation. A Chinese sentence can therefore be one piece of hundreds of bytes —
# which is why the merge loop below must not be quadratic in the piece length.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

ENDOFTEXT = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------
# 2. Encoding one piece: the merge rule
#
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
# soon as its pair exists: exactly the replay. (This assumes each token's bytes are built by one
# split only; where a vocabulary can build the same bytes two ways, the rank rule is simply the
# definition — tiktoken's, and ours.)
#
# Why gpt2's and cl100k's single-byte ids are not the byte values: GPT-2 stored its vocabulary as
# JSON text and mapped each byte to a printable character first, listing the 188 printable bytes
# ('!' .. '~', '¡' .. '¬', '®' .. 'ÿ') before the 68 others (controls, space, ...). So '!' (0x21)
# is id 0, 'A' is 32, byte 0x00 is 188 and the space (0x20) is 220; cl100k kept that order for
# its first 256 ranks. Single bytes are never the *result* of a merge, so their ranks are never
# compared: for them an id is just a name. Our trained vocabularies use id = byte value.

SMALL_PIECE = 24  # bytes: shorter pieces go to the simple loop, longer to the heap (measured)


def merge_piece_simple(piece, ranks):
    """The merge rule as written: O(n) per merge, O(n²) per piece, but each step runs in C.

    `parts` are the current tokens; `pair_ranks[i]` is the rank of parts[i] + parts[i+1]
    (or `missing` if that is not a token). min() and list.index() scan in C, so for the short
    pieces of ordinary text this beats any cleverer structure written in Python.
    """
    missing = 1 << 62  # larger than any rank
    get = ranks.get
    parts = [piece[i:i + 1] for i in range(len(piece))]
    pair_ranks = [get(piece[i:i + 2], missing) for i in range(len(piece) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == missing:
            break
        i = pair_ranks.index(best)  # leftmost of the lowest rank, as tiktoken
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i > 0:  # the pair on the left now ends with the new token
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], missing)
        if i < len(pair_ranks):  # and the pair on the right starts with it
            pair_ranks[i] = get(parts[i] + parts[i + 1], missing)
    return [ranks[p] for p in parts]


def merge_piece_heap(piece, ranks):
    """The same rule in O(n log n): a heap of candidate pairs over a linked list of parts.

    Part boundaries are byte offsets: the part starting at s ends at nxt[s] (n = end of piece),
    prv[s] is the start of the part before it, and nxt[s] = -1 marks a start swallowed by a
    merge. The heap holds (rank, start) for pairs; entries are never removed, only found stale
    when popped: a pair whose start is dead, or whose bytes changed (its rank no longer matches —
    a changed pair is longer, so it has another rank). Popping (rank, start) in heap order gives
    the lowest rank and, on ties, the leftmost start: exactly the simple loop's choice.
    """
    n = len(piece)
    get = ranks.get
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := get(piece[i:i + 2])) is not None]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        rank, s = pop(heap)
        e = nxt[s]  # start of the right-hand part
        if e < 0 or e >= n:
            continue  # s was swallowed, or is now the last part
        f = nxt[e]  # end of the pair
        if get(piece[s:f]) != rank:
            continue  # stale: the pair at s is no longer the one this entry was pushed for
        nxt[s], nxt[e] = f, -1  # [s, e) + [e, f) -> [s, f)
        if f < n:
            prv[f] = s
            r = get(piece[s:nxt[f]])
            if r is not None:
                push(heap, (r, s))
        p = prv[s]
        if p >= 0:
            r = get(piece[p:f])
            if r is not None:
                push(heap, (r, p))
    ids, s = [], 0
    while s < n:
        ids.append(ranks[piece[s:nxt[s]]])
        s = nxt[s]
    return ids


def merge_piece(piece, ranks):
    """The merge rule on bytes, by whichever of the two loops is faster for this length."""
    if len(piece) <= SMALL_PIECE:
        return merge_piece_simple(piece, ranks)
    return merge_piece_heap(piece, ranks)


def encode_piece(piece, ranks):
    """Token ids of one pre-token (bytes), by the rank rule.

    A piece that is itself a token is returned whole, before any merging — tiktoken does the
    same, and it matters: the merge path does not always end in the whole piece.
    """
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    return merge_piece(piece, ranks)


# Cutting a piece where no merge can ever cross.
#
# A merge only creates tokens, so if no token of the vocabulary spans the boundary between two
# characters of a piece, no part ever will, and the rank rule gives the same result on the two
# halves separately (merges on either side never touch each other; on a tie the two candidates
# are the same bytes, so order does not matter). For Chinese this is the common case: cl100k
# has a token for "一个" but none for most pairs of Han characters, so a 30-character run splits
# into short segments like "北京" that repeat and can be cached.
#
# Which tokens span the boundary between characters X and Y? Look inside a token at each of its
# own character boundaries: on the left is X whole, or a tail of X if the token *starts* mid-
# character; on the right Y whole, or a head of Y if the token *ends* mid-character (cl100k has
# " \xe5": a space and the first byte of many Han characters). We collect these left/right
# pairs once per vocabulary; a boundary in the text is closed when none of its possible
# left/right pairs occurs.


def spanning_pairs(ranks):
    """{left: {right, ...}} over every character boundary inside every token (bytes)."""
    right_of = defaultdict(set)
    for token in ranks:
        starts = [p for p, byte in enumerate(token) if not 0x80 <= byte < 0xC0]
        ends = starts[1:] + [len(token)]
        for k, p in enumerate(starts):
            if p > 0:  # a boundary inside the token
                right_of[token[starts[k - 1] if k else 0:p]].add(token[p:ends[k]])
    return dict(right_of)


def boundary_sides(char, right_of):
    """(right sides some token puts after `char` or after a tail of it, `char`'s heads).

    A boundary x|y is spanned exactly when the first set of x meets the second set of y.
    """
    b = char.encode("utf-8")
    rights = set()
    for k in range(1, len(b) + 1):
        rights |= right_of.get(b[-k:], set())
    heads = tuple(b[:k] for k in range(1, len(b) + 1))
    return frozenset(rights), heads


def closed_segments(piece, right_of, sides_cache):
    """Cut `piece` (str) at every character boundary that no token of the vocabulary spans."""
    try:
        sides = [sides_cache[char] for char in piece]
    except KeyError:  # a character seen for the first time
        for char in piece:
            if char not in sides_cache:
                sides_cache[char] = boundary_sides(char, right_of)
        sides = [sides_cache[char] for char in piece]
    # for most Han characters the first set is empty: nothing follows them inside a token
    cuts = [k for k in range(1, len(piece)) if sides[k - 1][0].isdisjoint(sides[k][1])]
    bounds = [0] + cuts + [len(piece)]
    return [piece[i:j] for i, j in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------------------------
# 3. Training
#
# Exact BPE: the training text is cut into pieces by the split pattern, each piece is a list of
# byte values, and each step merges the adjacent pair (a, b) that occurs most often, summed over
# all pieces; every occurrence is replaced, left to right, by one new token. Overlaps count as
# plain adjacent positions: "aaa" holds the pair (a, a) twice, and merging it gives [aa, a].
# Ties: the most frequent pair wins; among equally frequent pairs the smallest (a, b) in id order
# wins. Both trainers below follow this rule, so they must produce the same merges.
#
# If the joined bytes of the winning pair already are a token (built earlier from another split,
# e.g. "ab"+"c" and then "a"+"bc"), the pair is merged into that existing token and no new id is
# spent — ids stay dense and each byte string has one id, which `ranks` (a dict keyed by bytes)
# needs.


def count_chunks(text, pattern, special_tokens=()):
    """Distinct pre-tokens with their multiplicities: {piece bytes: count}.

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


def merge_ids(ids, a, b, new):
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


def train_naive(chunk_counts, num_merges):
    """The readable reference trainer: recount every pair from scratch before each merge.

    Returns (merges, vocab): merges is a list of ((a, b), new_id) in order, vocab the list of
    token bytes by id. Cost per merge: the length of the whole corpus — fine for a lesson, and
    for checking the fast trainer, far too slow for real text.
    """
    words = [(list(chunk), count) for chunk, count in chunk_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    merges = []
    while len(vocab) < 256 + num_merges:
        stats = Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += count
        if not stats:
            break  # every piece is a single token: nothing left to merge
        a, b = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new = new_token(vocab, index, a, b)
        merges.append(((a, b), new))
        words = [(merge_ids(ids, a, b, new), count) for ids, count in words]
    return merges, vocab


def merge_in_piece(ids, a, b, new, count, stats, where, i, born):
    """Merge (a, b) -> new inside piece i, in place, and fix the pair counts *locally*.

    Only pairs that touch an occurrence change. For an occurrence at k (old tokens ... x a b y ...):
        on the left (x, a) becomes (left, new), where `left` is ids[k-1] as it is now — `new`
        itself if the previous occurrence ended just before (and then the old x was b); on the
        right (b, y) becomes (new, y), unless y starts the next occurrence, whose own left side
        will handle that pair. (a, b) itself is dropped by the caller.
    Each change is weighted by the piece's multiplicity `count`. Pairs born here are counted in
    `born` (added to `stats` by the caller) and noted in `where`. Returns False if the pair does
    not occur (a stale `where` entry).
    """
    k, last, found, n = 0, -2, False, len(ids)
    unseen = ids.count(a)  # `a`s still to look at: we stop without a failing search
    while unseen:
        k = ids.index(a, k)
        unseen -= 1
        if k + 1 == n or ids[k + 1] != b:
            k += 1
            continue
        found = True
        if a == b:
            unseen -= 1  # the `b` we are about to swallow was one of the `a`s
        if k:
            left = ids[k - 1]
            stats[b if last == k - 1 else left, a] -= count
            pair = (left, new)
            born[pair] = born.get(pair, 0) + count
            where[pair].add(i)
        if k + 2 < n:
            y = ids[k + 2]
            if y != a or k + 3 == n or ids[k + 3] != b:
                stats[b, y] -= count
                pair = (new, y)
                born[pair] = born.get(pair, 0) + count
                where[pair].add(i)
        ids[k] = new
        del ids[k + 1]
        n -= 1
        last = k
        k += 1
    return found


def count_pairs(words, counts):
    """Initial pair counts (with multiplicity) and, per pair, the pieces that hold it."""
    once = (zip(ids, ids[1:]) for ids, count in zip(words, counts) if count == 1)
    stats = Counter(chain.from_iterable(once))  # the bulk of the counting runs in C
    for ids, count in zip(words, counts):
        if count > 1:
            for pair in zip(ids, ids[1:]):
                stats[pair] += count
    where = defaultdict(set)
    for i, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            where[pair].add(i)
    return defaultdict(int, stats), where  # defaultdict: its missing-key path is in C


def train_fast(chunk_counts, num_merges, progress=None):
    """The same merges as train_naive, with work proportional to what each merge changes.

    State: `words[i]` (ids of distinct piece i) and `counts[i]`; `stats[pair]` = occurrences
    summed over pieces with multiplicity; `where[pair]` = pieces that may hold the pair (it may
    hold stale entries: a piece that lost the pair is skipped when merged); a heap of
    (-count, a, b): the smallest tuple is the most frequent pair, ties to the smallest (a, b) —
    the documented rule.
    Heap entries are not updated in place. Counts that grow (pairs born in a merge) are pushed
    at once; counts that shrink are fixed when their entry surfaces: it is pushed again with
    the true count. So every pair always has an entry at least as high as its true priority, and
    the first popped entry that is still exact is the true most frequent pair.
    `progress(step, num_merges, token_bytes, count)` is called after each merge if given.
    """
    words = [list(chunk) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    stats, where = count_pairs(words, counts)
    heap = [(-c, a, b) for (a, b), c in stats.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    merges = []
    while len(vocab) < 256 + num_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        true_count = stats.get((a, b), 0)
        if true_count != -neg_count:
            if 0 < true_count < -neg_count:
                heapq.heappush(heap, (-true_count, a, b))  # it shrank: re-file it
            continue
        new = new_token(vocab, index, a, b)
        merges.append(((a, b), new))
        born = {}  # pairs with the new token -> their count
        for i in where.pop((a, b)):
            merge_in_piece(words[i], a, b, new, counts[i], stats, where, i, born)
        del stats[a, b]  # every occurrence is gone
        for pair, count in born.items():
            stats[pair] += count
            heapq.heappush(heap, (-stats[pair], pair[0], pair[1]))
        if progress is not None:
            progress(len(merges), num_merges, vocab[new], -neg_count)
    return merges, vocab


# ----------------------------------------------------------------------------------------------
# 4. The tokenizer


FILE_FORMAT = "bpe-tokenizer-1"  # first line of the header of saved files


def readable(token):
    """Token bytes for human eyes: text where they are whole characters, \\xNN for the rest
    (half a Han character), escapes for invisible characters, in quotes so spaces show."""
    text = token.decode("utf-8", errors="backslashreplace")
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


def _replace_surrogates(text):
    """Lone surrogates -> U+FFFD, the way tiktoken cleans text it cannot turn into UTF-8."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class BPETokenizer:
    """A byte-level BPE tokenizer: `ranks` (token bytes -> id), a split pattern, special tokens.

    Special tokens (e.g. "<|endoftext|>") are strings with ids of their own that no merge can
    produce; they live outside `ranks`. tiktoken's semantics: `encode` refuses text that spells
    a special token unless you allow it (a document could otherwise forge an end-of-text), and
    `encode_ordinary` treats such text as plain characters.
    """

    CACHE_SIZE = 1 << 16  # pieces remembered; cleared when full (cheap, and rarely needed)
    CACHE_MAX_PIECE = 256  # characters; longer pieces are rarely repeated

    def __init__(self, ranks, pattern, special_tokens=None, name="bpe"):
        self.ranks = dict(ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._split = regex.compile(pattern)
        self._decoder = {i: t for t, i in self.ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        if len(self._decoder) != len(self.ranks) + len(self.special_tokens):
            raise ValueError("token ids must be unique across ranks and special tokens")
        self._n_vocab = max(self._decoder) + 1
        self._cache = {}  # piece -> ids
        self._segment_cache = {}  # closed segment -> ids (see closed_segments)
        self._sides_cache = {}  # character -> boundary_sides(character, ...)
        self._spanning = None  # spanning_pairs(ranks), built on the first non-ASCII piece
        self._special_regex_cache = {}

    def __repr__(self):
        return (f"BPETokenizer(name={self.name!r}, n_vocab={self.n_vocab}, "
                f"special_tokens={self.special_tokens})")

    @property
    def n_vocab(self):
        """One more than the largest id: the size the embedding table needs."""
        return self._n_vocab

    @property
    def eot_token(self):
        """Id of <|endoftext|>, the document separator."""
        if ENDOFTEXT not in self.special_tokens:
            raise KeyError(f"tokenizer {self.name!r} has no {ENDOFTEXT} special token")
        return self.special_tokens[ENDOFTEXT]

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_tiktoken(cls, name):
        """OpenAI's vocabulary `name` ("gpt2", "cl100k_base") via tiktoken's own loaders.

        Works offline when TIKTOKEN_CACHE_DIR holds the downloaded files.
        """
        from tiktoken_ext import openai_public

        if name not in openai_public.ENCODING_CONSTRUCTORS:
            known = ", ".join(openai_public.ENCODING_CONSTRUCTORS)
            raise ValueError(f"unknown tiktoken encoding {name!r}; known: {known}")
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
        return cls(spec["mergeable_ranks"], spec["pat_str"], spec["special_tokens"], name=name)

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT4_SPLIT_PATTERN, special_tokens=None,
              name="bpe", progress=None):
        """Learn a vocabulary of exactly `vocab_size` ids from `text` (fewer only if the text runs
        out of pairs).

        Ids 0..255 are the byte values, then one id per merge, then the special tokens — by
        default just <|endoftext|>, which therefore gets id vocab_size - 1. `special_tokens` is a
        list of strings (ids are assigned in that order after the merges). `progress`, if
        given, is called after each merge as progress(step, total, token_bytes, count).
        """
        specials = [ENDOFTEXT] if special_tokens is None else list(special_tokens)
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be at least {256 + len(specials)} (256 byte tokens "
                             f"+ {len(specials)} special tokens), got {vocab_size}")
        chunk_counts = count_chunks(text, pattern, specials)
        _, vocab = train_fast(chunk_counts, vocab_size - 256 - len(specials), progress)
        ranks = {token: i for i, token in enumerate(vocab)}
        special_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
        return cls(ranks, pattern, special_ids, name=name)

    # -- encoding -------------------------------------------------------------------------------

    def _remember(self, cache, text, ids):
        """Keep the ids of a short text in a cache; a full cache is emptied first (cheap, rare)."""
        if len(text) <= self.CACHE_MAX_PIECE:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[text] = ids

    def _encode_new_piece(self, piece):
        """Ids of a piece (str) not in the cache: whole token, else merge per closed segment."""
        data = piece.encode("utf-8")
        rank = self.ranks.get(data)
        if rank is not None:
            return [rank]
        if piece.isascii():
            return merge_piece(data, self.ranks)
        if self._spanning is None:
            self._spanning = spanning_pairs(self.ranks)
        ids, cache = [], self._segment_cache
        for segment in closed_segments(piece, self._spanning, self._sides_cache):
            segment_ids = cache.get(segment)
            if segment_ids is None:
                segment_ids = merge_piece(segment.encode("utf-8"), self.ranks)
                self._remember(cache, segment, segment_ids)
            ids += segment_ids
        return ids

    def _encode_chunk(self, text):
        """Ids of text that holds no special token: split, then merge inside each piece."""
        cache = self._cache
        ids = []
        for piece in self._split.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_new_piece(piece)
                self._remember(cache, piece, piece_ids)
            ids += piece_ids
        return ids

    def encode_ordinary(self, text):
        """Ids of `text`, treating text that spells a special token as ordinary characters."""
        try:
            return self._encode_chunk(text)
        except UnicodeEncodeError:
            # Lone surrogates (possible in a Python str) have no UTF-8 form; tiktoken replaces
            # them with U+FFFD, and so do we.
            return self._encode_chunk(_replace_surrogates(text))

    def _special_regex(self, tokens):
        key = frozenset(tokens)
        if key not in self._special_regex_cache:
            # longest first, so "<|a|>b" is not cut short by a shorter token "<|a|>"
            alternatives = sorted(tokens, key=len, reverse=True)
            self._special_regex_cache[key] = regex.compile(
                "(" + "|".join(regex.escape(t) for t in alternatives) + ")")
        return self._special_regex_cache[key]

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
            found = self._special_regex(disallowed).search(text)
            if found:
                raise ValueError(
                    f"text contains the special token {found.group()!r}, which is disallowed. "
                    f"To encode it as a special token pass allowed_special={{{found.group()!r}}} "
                    f"(or 'all'); to encode it as plain text pass disallowed_special=() "
                    f"or use encode_ordinary().")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        # re.split with one group: [text, special, text, special, ..., text]
        for k, part in enumerate(self._special_regex(allowed).split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self.encode_ordinary(part)
        return ids

    # -- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes the ids stand for, concatenated."""
        try:
            return b"".join([self._decoder[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in {self.name!r} "
                             f"(ids are below {self.n_vocab})") from None

    def decode(self, ids, errors="replace"):
        """The text the ids stand for. A token may hold part of a UTF-8 character (GPT-2 spends
        two or three tokens on many Han characters), so a cut sequence can end mid-character:
        errors="replace" shows that as U+FFFD instead of failing."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, path):
        """Write a plain-text file a person can read: a header, then one token per line as
        `id <tab> bytes in hex <tab> the bytes shown as a Python string` (only id and hex are
        read back)."""
        lines = [
            "# bpe.py tokenizer: one token per line: id, bytes as hex, readable form",
            f"format: {FILE_FORMAT}",
            f"name: {json.dumps(self.name, ensure_ascii=False)}",
            f"pattern: {json.dumps(self.pattern, ensure_ascii=False)}",
            f"special_tokens: {json.dumps(self.special_tokens, ensure_ascii=False)}",
            f"tokens: {len(self.ranks)}",
            "---",
        ]
        for token, i in sorted(self.ranks.items(), key=lambda item: item[1]):
            lines.append(f"{i}\t{token.hex()}\t{readable(token)}")
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path):
        """Read a file written by save()."""
        text = pathlib.Path(path).read_text(encoding="utf-8")
        header_text, sep, body = text.partition("\n---\n")
        header = dict(line.split(": ", 1) for line in header_text.splitlines()
                      if ": " in line and not line.startswith("#"))
        if not sep or header.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a tokenizer file written by bpe.py "
                             f"(expected a 'format: {FILE_FORMAT}' header and a '---' line)")
        ranks = {}
        for line in body.splitlines():
            i, hex_bytes, _ = line.split("\t", 2)
            ranks[bytes.fromhex(hex_bytes)] = int(i)
        if len(ranks) != int(header["tokens"]):
            raise ValueError(f"{path}: header says {header['tokens']} tokens, found {len(ranks)}")
        return cls(ranks, json.loads(header["pattern"]), json.loads(header["special_tokens"]),
                   name=json.loads(header["name"]))

    def to_dict(self):
        """Plain Python types only (str, int, list, dict), so a checkpoint holding it loads with
        torch.load(weights_only=True). Tokens are hex strings, listed in id order."""
        tokens = sorted(self.ranks.items(), key=lambda item: item[1])
        if [i for _, i in tokens] != list(range(len(tokens))):
            raise ValueError("to_dict needs ranks with ids 0..len(ranks)-1")
        return {"format": FILE_FORMAT, "name": self.name, "pattern": self.pattern,
                "special_tokens": dict(self.special_tokens),
                "tokens": [token.hex() for token, _ in tokens]}

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict()."""
        ranks = {bytes.fromhex(h): i for i, h in enumerate(d["tokens"])}
        return cls(ranks, d["pattern"], d["special_tokens"], name=d["name"])



def tokenizer_to_dict(tok):
    """BPETokenizer -> dict of plain types (see BPETokenizer.to_dict)."""
    return tok.to_dict()


def tokenizer_from_dict(d):
    """dict from tokenizer_to_dict -> BPETokenizer."""
    return BPETokenizer.from_dict(d)


# ----------------------------------------------------------------------------------------------
# 5. The fast encoder for the other lessons


def get_tokenizer(name):
    """A `tiktoken.Encoding` (Rust, multi-threaded `encode_ordinary_batch`) for:

    "gpt2" / "cl100k_base" (any tiktoken name), the path of a file written by BPETokenizer.save,
    a dict from to_dict() (or {"name": "gpt2"}), or a BPETokenizer. Same ids as BPETokenizer:
    tiktoken applies the same split pattern and the same lowest-rank merge rule.
    """
    if isinstance(name, dict):
        if "tokens" not in name:
            return get_tokenizer(name["name"])
        name = BPETokenizer.from_dict(name)
    if isinstance(name, BPETokenizer):
        return tiktoken.Encoding(name=name.name, pat_str=name.pattern,
                                 mergeable_ranks=name.ranks, special_tokens=name.special_tokens)
    if name in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(name)
    if pathlib.Path(name).is_file():
        return get_tokenizer(BPETokenizer.load(name))
    raise ValueError(f"unknown tokenizer {name!r}: use gpt2, cl100k_base, or the path of a file "
                     f"written by `python bpe.py train FILE --vocab_size N --out PATH`")


# ----------------------------------------------------------------------------------------------
# 6. Report: what each vocabulary does to a text
#
# GPT-2 saw little Chinese when its merges were learned, so most Han characters are not tokens:
# each costs two or three tokens, and most of its tokens on Chinese are fragments of a character.
# A model that writes one token at a time then prints "�" whenever a character is cut between
# tokens (garbled), and its context window holds half as many characters (expensive). cl100k is
# better but still spends a third of a 100k table on English-like tokens a Chinese model never
# needs. The report makes both visible: chars/token, bytes/token and the fragment share.


def partial_token_ids(enc):
    """Ids whose bytes are not whole UTF-8 characters (e.g. 2 of the 3 bytes of a Han char)."""
    partial = set()
    for i in range(enc.n_vocab):
        try:
            enc.decode_single_token_bytes(i).decode("utf-8")
        except KeyError:
            continue  # a hole in the id space
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
# 7. Command line


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _read_text(path, max_mb=None):
    path = pathlib.Path(path)
    if not path.is_file():
        _fail(f"no file at {path} — pass the path of a UTF-8 text file")
    data = path.read_bytes()
    if max_mb:
        data = data[:int(max_mb * 1e6)]
    try:
        # a cut by --max_mb may split the last character: ignore only that
        return data.decode("utf-8", errors="ignore" if max_mb else "strict")
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 (bad byte at offset {e.start}) — convert it first, e.g. "
              f"iconv -f GB18030 -t UTF-8 {path} > {path.stem}.utf8.txt")


def _cmd_train(args):
    if args.vocab_size < 257:
        _fail(f"--vocab_size must be at least 257 (256 byte tokens + <|endoftext|>), "
              f"got {args.vocab_size}; try --vocab_size 4096")
    text = _read_text(args.file, args.max_mb)
    pattern = GPT4_SPLIT_PATTERN if args.pattern == "gpt4" else GPT2_SPLIT_PATTERN
    t0 = time.time()
    every = max(1, (args.vocab_size - 257) // 20)

    def progress(step, total, token, count):
        if step % every == 0 or step == total:
            print(f"merge {step:>6}/{total}  {readable(token):<24} count {count:>9,}  "
                  f"{time.time() - t0:6.1f}s", file=sys.stderr)

    name = pathlib.Path(args.out).stem
    tok = BPETokenizer.train(text, args.vocab_size, pattern=pattern, name=name, progress=progress)
    tok.save(args.out)
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')):,} bytes in "
          f"{time.time() - t0:.1f}s -> {args.out}")


def _cmd_report(args):
    text = _read_text(args.file, args.max_mb)
    encodings = [("gpt2", get_tokenizer("gpt2")), ("cl100k_base", get_tokenizer("cl100k_base"))]
    for path in args.vocab or []:
        if not pathlib.Path(path).is_file():
            _fail(f"no vocabulary at {path} — make one with: python bpe.py train FILE "
                  f"--vocab_size 4096 --out {path}")
        try:
            encodings.append((pathlib.Path(path).name, get_tokenizer(path)))
        except (ValueError, UnicodeDecodeError) as e:
            _fail(f"cannot read vocabulary {path}: {e}")
    print(token_report(text, encodings))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train byte-level BPE vocabularies and compare "
                                                 "tokenizers on a text.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="learn a vocabulary from a UTF-8 text file")
    p.add_argument("file", help="UTF-8 text to learn from")
    p.add_argument("--vocab_size", type=int, required=True,
                   help="total ids, counting 256 bytes and <|endoftext|> (at least 257)")
    p.add_argument("--out", required=True, help="where to write the vocabulary (plain text)")
    p.add_argument("--pattern", choices=["gpt4", "gpt2"], default="gpt4",
                   help="split pattern: gpt4 (cl100k, default) or gpt2")
    p.add_argument("--max_mb", type=float, default=None, help="use only the first N MB")
    p.set_defaults(run=_cmd_train)
    p = sub.add_parser("report", help="markdown table of token counts for gpt2, cl100k_base "
                                      "and your vocabularies")
    p.add_argument("file", help="UTF-8 text to measure")
    p.add_argument("--vocab", action="append", help="a vocabulary file from `train` (repeatable)")
    p.add_argument("--max_mb", type=float, default=None, help="use only the first N MB")
    p.set_defaults(run=_cmd_report)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
