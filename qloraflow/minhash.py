"""MinHash signatures of word shingles, computed with numpy: what near-duplicate removal compares.

Texts are split into words by byte class (no decoding), each run of ``shingle_size`` words is hashed
with a polynomial rolling hash, and all ``num_perm`` permutations of a block of shingles are applied
in one ``(a * x + b) mod 2**32`` matrix operation. The values are exactly those of
``datasketch.MinHash(num_perm, seed, scheme="affine32")`` fed with :func:`shingle_hashes` (a test holds
them equal), so datasketch's ``MinHashLSH`` can index them::

    from qloraflow.minhash import minhash_signatures
    sigs = minhash_signatures(["a b c d", "a b c e"], num_perm=128, shingle_size=3)

Lines that many records share (:func:`shared_lines`) can be left out of a text's shingles, so that a
system prompt or a schema does not decide how similar two records are (see ``qloraflow.dedupe``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np

_U64 = np.uint64
_U32 = np.uint32
# Byte classes: 0 separates words; 1 is part of a word (ASCII letters, '_', like regex \w, and every
# byte of a multi-byte UTF-8 character, so non-Latin words stay words without decoding); 2 is a digit.
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")] = 1
_BYTE_CLASS[0x80:] = 1
_BYTE_CLASS[list(b"0123456789")] = 2
# Polynomial rolling hash of a word's bytes: prefix sums of byte * B**i, rebased by B**-start so a
# word hashes the same wherever it occurs. B is odd, hence invertible modulo 2**64.
_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
_SIG_BLOCK = 4096  # shingles per permutation matrix: 128 x 4,096 uint32 (2 MiB) stays in cache
VARYING, SHARED, SEAM = 0, 1, 2  # kinds of shingle, where shared lines are known (see _shingles)
_WORDS = re.compile("[a-z0-9_\u0080-\U0010ffff]+")  # a word as _BYTE_CLASS splits them, on lowercased text


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads polynomial hashes over all bits."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def odd_multipliers(k: int, salt: int) -> np.ndarray:
    """k fixed, well-mixed odd 64-bit constants (odd: multiplying by one loses no bits)."""
    return fmix64((np.arange(1, k + 1, dtype=_U64) + _U64(salt)) * _U64(0x9E3779B97F4A7C15)) | _U64(1)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, the pre-mix of datasketch's affine32 scheme."""
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h ^= h >> _U32(13)
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


_pow_cache: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """B**i and B**-i modulo 2**64 for i < n (grown geometrically, cached per process)."""
    if len(_pow_cache.get("pow", ())) < n:
        size = max(n, 2 * len(_pow_cache.get("pow", ())), 1 << 16)
        for key, base in (("pow", _BASE), ("inv", _BASE_INV)):
            p = np.full(size, base, dtype=_U64)
            p[0] = 1
            _pow_cache[key] = np.cumprod(p, dtype=_U64)  # wraps modulo 2**64, which is the point
    return _pow_cache["pow"], _pow_cache["inv"]


def shared_lines(texts: Sequence[str], min_records: int) -> frozenset[bytes]:
    """The lines that at least ``min_records`` of the texts contain: their shared text.

    A system prompt, a database schema or a template's fixed lines recur verbatim in many records,
    while near copies of one another differ inside their lines. Lines are compared lowercased (as
    shingles are) and counted once per text; lines without a letter or digit never count.

    Args:
        texts: The texts (each line of a text is one of its turns, or part of one).
        min_records: Texts a line must be in to be shared (< 2: none is).

    Returns:
        The shared lines, lowercased and UTF-8 encoded (what :func:`shingle_hashes` marks).
    """
    if min_records < 2:
        return frozenset()
    counts: Counter = Counter()
    for text in texts:
        counts.update(set(text.lower().split("\n")))
    return frozenset(line.encode("utf-8", "surrogatepass") for line, n in counts.items()
                     if n >= min_records and any(c.isalnum() for c in line))


def short_text_keys(texts: Sequence[str], max_words: int) -> list[int]:
    """Per text, a 64-bit key of its words when it has fewer than ``max_words`` (else 0).

    Words are split as in :func:`shingle_hashes` (lowercased; punctuation and spacing ignored), so
    ``"SELECT name FROM t;"`` and ``"select name from t"`` share a key. Given as ``distinct_keys`` to
    :func:`dedupe_texts`, it makes short texts that differ in a word never near duplicates: one
    word of a six-word answer can be the whole answer (another column, another label), which
    word 3-gram Jaccard cannot tell from a typo. Empty texts get 0.
    """
    keys = []
    for text in texts:
        words = _WORDS.findall(text.lower())
        if not words or len(words) >= max_words:
            keys.append(0)
            continue
        digest = hashlib.blake2b(" ".join(words).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") or 1)
    return keys


def shingle_hashes(texts: Sequence[str], shingle_size: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-bit hashes of the word shingles of many texts, computed for all of them at once.

    Text is lowercased and split into words at every byte that is not a letter, digit, ``_`` or
    part of a non-ASCII character. A text with fewer words than ``shingle_size`` gets a single
    shingle of all its words; a text without words gets none.

    Args:
        texts: The texts.
        shingle_size: Words per shingle (>= 1).

    Returns:
        ``(hashes, offsets, number_keys)``: the shingle hashes of text ``i`` are
        ``hashes[offsets[i]:offsets[i + 1]]`` (uint64, in text order, repeats kept);
        ``number_keys[i]`` hashes the sequence of words that contain a digit (0 when none), so
        two texts that differ only in a number have different keys.
    """
    return _shingles(texts, shingle_size)[:3]


def _shingles(texts: Sequence[str], shingle_size: int, shared: frozenset[bytes] = frozenset()
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """:func:`shingle_hashes`, and per shingle its kind: VARYING, SHARED (all its words lie in
    ``shared`` lines) or SEAM (some do); None when no text has a shared line."""
    if shingle_size < 1:
        raise ValueError(f"shingle_size must be >= 1, got {shingle_size}")
    n = len(texts)
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    # One buffer for all texts; a \x00 before and after each keeps words from running across.
    buf = np.frombuffer(b"\x00" + b"\x00".join(encoded) + b"\x00", dtype=np.uint8)
    text_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(e) + 1 for e in encoded], out=text_starts[1:])

    cls = _BYTE_CLASS.take(buf)
    is_word = cls != 0
    w_start = np.flatnonzero(is_word[1:] & ~is_word[:-1]) + 1
    w_end = np.flatnonzero(is_word[:-1] & ~is_word[1:]) + 1
    pw, inv = _powers(len(buf))
    prefix = np.zeros(len(buf) + 1, dtype=_U64)
    np.multiply(buf, pw[: len(buf)], out=prefix[1:], dtype=_U64)
    np.cumsum(prefix, out=prefix)
    words = fmix64((prefix[w_end] - prefix[w_start]) * inv[w_start])

    # Word -> text, and each text's range of words.
    w_text = np.searchsorted(text_starts, w_start, side="right") - 1
    first_word = np.searchsorted(w_text, np.arange(n + 1), side="left")
    n_words = np.diff(first_word)

    # Shingle at word p = sum_j words[p + j] * M_j over the words of p's text (missing ones count
    # as 0, which gives short texts their single shingle).
    k = shingle_size
    mults = odd_multipliers(k, 0)  # a different multiplier per position: "a b c" != "c b a"
    end_of_text = first_word[1:][w_text]
    padded = np.concatenate([words, np.zeros(k, dtype=_U64)])
    pos = np.arange(len(words))
    combined = words * mults[0]
    for j in range(1, k):
        part = padded[j: j + len(words)] * mults[j]
        part[pos + j >= end_of_text] = 0
        combined += part
    keep = (pos + k <= end_of_text) | ((pos == first_word[:-1][w_text]) & (n_words[w_text] < k))
    hashes = fmix64(combined[keep])
    counts = np.bincount(w_text[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    # Number key: an order-sensitive sum over the words holding a digit.
    digit_pos = np.flatnonzero(cls == 2)
    if len(digit_pos) < len(w_start):  # usual text: few digits, find their words
        digit_word = np.searchsorted(w_start, digit_pos, side="right") - 1
        numeric = digit_word[np.diff(digit_word, prepend=-1) != 0]
    else:  # digit-heavy text: the largest class between two word starts is 2 iff a digit is there
        numeric = np.flatnonzero(np.maximum.reduceat(cls, w_start) == 2)
    number_keys = np.zeros(n, dtype=_U64)
    if len(numeric):
        owner = w_text[numeric]
        group_start = np.searchsorted(owner, owner, side="left")
        rank = (np.arange(len(numeric)) - group_start + 1).astype(_U64)
        np.add.at(number_keys, owner, fmix64(words[numeric] ^ (rank * _U64(0x9E3779B97F4A7C15))))
    in_shared = _in_shared_lines(buf, prefix, inv, shared, w_start) if shared else None
    if in_shared is None:
        return hashes, offsets, number_keys, None
    # A shingle varies when none of its words is in a shared line, is shared when all are, and is
    # a seam (a shared line's end joined to what follows) otherwise.
    in_shared_words = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(in_shared, out=in_shared_words[1:])
    window_end = np.minimum(pos + k, end_of_text)
    shared_words = (in_shared_words[window_end] - in_shared_words[pos])[keep]
    kind = np.where(shared_words == 0, VARYING, np.where(shared_words == (window_end - pos)[keep], SHARED, SEAM))
    return hashes, offsets, number_keys, kind.astype(np.int8)


def _in_shared_lines(buf: np.ndarray, prefix: np.ndarray, inv: np.ndarray, shared: frozenset[bytes],
                     w_start: np.ndarray) -> Optional[np.ndarray]:
    """Per word (by its first byte in the joined buffer): inside one of the ``shared`` lines? None
    when no line is one. Lines are matched by a 64-bit hash of their bytes, the words' rolling hash."""
    breaks = np.flatnonzero((buf == 0x0A) | (buf == 0))  # \n, and the \x00 around every text
    starts, ends = breaks[:-1] + 1, breaks[1:]
    line_is_shared = np.isin(fmix64((prefix[ends] - prefix[starts]) * inv[starts]), _line_hashes(shared))
    if not line_is_shared.any():
        return None
    return line_is_shared[np.maximum(np.searchsorted(starts, w_start, side="right") - 1, 0)]


_line_hash_cache: dict[frozenset, np.ndarray] = {}


def _line_hashes(lines: frozenset[bytes]) -> np.ndarray:
    """The hashes :func:`_in_shared_lines` gives these lines (cached: a worker gets the same set per chunk)."""
    if lines not in _line_hash_cache:
        ordered = sorted(lines)
        buf = np.frombuffer(b"\x00" + b"\x00".join(ordered) + b"\x00", dtype=np.uint8)
        pw, inv = _powers(len(buf))
        prefix = np.zeros(len(buf) + 1, dtype=_U64)
        np.multiply(buf, pw[: len(buf)], out=prefix[1:], dtype=_U64)
        np.cumsum(prefix, out=prefix)
        starts = np.cumsum([0] + [len(x) + 1 for x in ordered[:-1]]) + 1
        ends = starts + np.array([len(x) for x in ordered], dtype=np.int64)
        _line_hash_cache.clear()  # one set per run
        _line_hash_cache[lines] = np.sort(fmix64((prefix[ends] - prefix[starts]) * inv[starts]))
    return _line_hash_cache[lines]


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The affine permutations ``a * x + b mod 2**32`` of datasketch's affine32 scheme.

    Generated exactly as ``datasketch.MinHash(num_perm, seed).permutations`` (a test checks it),
    without importing datasketch, whose scipy import costs worker processes a second each.
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=_U32) * _U32(2) + _U32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=_U32)
    return a, b


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, shingle_size: int = 3,
                       seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MinHash signatures of many texts, vectorised over shingles and permutations.

    Args:
        texts: The texts.
        num_perm: Permutations per signature.
        shingle_size: Words per shingle.
        seed: Permutation seed (datasketch's default is 1).

    Returns:
        ``(signatures, has_shingles, number_keys)``: ``signatures`` is ``(len(texts), num_perm)``
        uint32 and row ``i`` equals the ``hashvalues`` of ``datasketch.MinHash(num_perm, seed,
        scheme="affine32", hashfunc=int)`` updated with text ``i``'s 64-bit shingle hashes folded to
        32 bits (``h ^ h >> 32``); rows of texts without words are all ``2**32 - 1``.
    """
    return minhash_by_kind(texts, num_perm, shingle_size, seed)[:3]


def minhash_by_kind(texts: Sequence[str], num_perm: int, shingle_size: int, seed: int,
                    shared: frozenset[bytes] = frozenset()
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[tuple[np.ndarray, ...]]]:
    """:func:`minhash_signatures`, and the signatures of what varies when ``shared`` lines occur.

    The fourth value is None when no text holds a shared line; else ``(varying, unseamed, touches)``:
    row ``i`` of ``varying`` is the signature of text ``i``'s VARYING shingles, of ``unseamed`` that
    of its VARYING and SHARED ones (the full text less the seams, whose words depend on which
    shared line ends where); a text without VARYING shingles gets its full signature in both;
    ``touches[i]``: text ``i`` has a SHARED or SEAM shingle. Each kind of shingle is permuted once
    and the full signature is the minimum of the three, so this costs what the full one alone does.
    """
    a, b = permutations(num_perm, seed)
    hashes, offsets, number_keys, kind = _shingles(texts, shingle_size, shared)
    x = _fmix32((hashes ^ (hashes >> _U64(32))).astype(_U32))
    has = offsets[1:] > offsets[:-1]
    if kind is None:
        return _min_hashes(x, offsets, a, b), has, number_keys, None
    owner = np.repeat(np.arange(len(texts)), np.diff(offsets))
    parts = []
    for k in (VARYING, SHARED, SEAM):  # each kind's shingles, still grouped by text and in order
        mask = kind == k
        part_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner[mask], minlength=len(texts)), out=part_offsets[1:])
        parts.append((_min_hashes(x[mask], part_offsets, a, b), part_offsets))
    (varying, v_offsets), (shared_only, s_offsets), (seams, m_offsets) = parts
    unseamed = np.minimum(varying, shared_only)
    full = np.minimum(unseamed, seams)
    only_shared = v_offsets[1:] == v_offsets[:-1]
    varying[only_shared] = unseamed[only_shared] = full[only_shared]
    touches = (s_offsets[1:] > s_offsets[:-1]) | (m_offsets[1:] > m_offsets[:-1])
    return full, has, number_keys, (varying, unseamed, touches)


def _min_hashes(x: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(texts, permutations)`` minima of ``a * x + b`` over each text's ``x[offsets[i]:offsets[i + 1]]``
    (all ``2**32 - 1`` for a text without any)."""
    n, num_perm = len(offsets) - 1, len(a)
    a, b = a[:, None], b[:, None]
    sigs = np.full((num_perm, n), np.iinfo(_U32).max, dtype=_U32)
    has = offsets[1:] > offsets[:-1]
    # Blocks of whole records with about _SIG_BLOCK shingles keep the (permutations x shingles)
    # matrix in cache; one buffer is reused, so the loop allocates little per block. Permutations
    # run along rows so each record's minimum is a reduction over contiguous memory.
    bounds = np.searchsorted(offsets, np.arange(0, offsets[-1], _SIG_BLOCK), side="right") - 1
    bounds = np.unique(np.concatenate([bounds, [n]]))
    longest = int(np.max(np.diff(offsets[bounds]), initial=1))
    work = np.empty((num_perm, max(longest, 1)), dtype=_U32)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = np.flatnonzero(has[lo:hi]) + lo  # reduceat cannot express an empty record
        if not len(rows):
            continue
        xs = x[offsets[lo]: offsets[hi]]
        m = work[:, : len(xs)]
        np.multiply(a, xs[None, :], out=m)
        m += b
        sigs[:, rows] = np.minimum.reduceat(m, offsets[rows] - offsets[lo], axis=1)
    return np.ascontiguousarray(sigs.T)


def jaccard(text_a: str, text_b: str, shingle_size: int = 3) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (1.0 when both have none)."""
    hashes, offsets, _ = shingle_hashes([text_a, text_b], shingle_size)
    sa, sb = set(hashes[: offsets[1]].tolist()), set(hashes[offsets[1]:].tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0
