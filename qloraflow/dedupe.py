"""Exact and near-duplicate removal: one hash per record, then MinHash LSH over word shingles.

Records are compared in the order given and the first of each cluster is kept, so a caller that
puts the frozen test records first gets "a train copy of a test record is removed, never the test
one" for free. Near duplicates are found with datasketch's ``MinHashLSH`` as the index; the
signatures that go into it are computed here with numpy (all permutations of a block of records
in one ``(a * x + b) mod 2**32`` matrix operation) and, for large inputs, in worker processes.
The values are exactly those of ``datasketch.MinHash(num_perm, seed, scheme="affine32")`` fed
with :func:`shingle_hashes` (a test holds them equal), so the index sees ordinary MinHashes.
Only records that share a band with another record go through the index (the others can have
no candidate), and every candidate it returns is verified with the Jaccard similarity estimated
from the two full signatures (what ``MinHash.jaccard`` computes) before anything is removed::

    from qloraflow.dedupe import dedupe_texts
    result = dedupe_texts(texts, threshold=0.8, num_perm=128, shingle_size=3)
    removed = [(i, result.duplicate_of[i]) for i in range(len(texts)) if not result.kept[i]]

Text that many records share (a system prompt, a database schema, a template: lines found
verbatim in ``shared_line_records`` records or more) decides nothing: with it, records are compared
on what varies, and a match must hold on the full texts as well (so shared text can keep records
apart, never merge them). Only the records that share a band need signatures of what varies, so
inputs without duplicates cost what they did. ``distinct_keys`` keeps records with different keys
apart (the data stage keys short answers with :func:`short_text_keys`)::

    result = dedupe_texts(texts, shared_line_records=10, distinct_keys=short_text_keys(answers, 32))
    result.shared_text_merges  # records kept that comparing full texts would have removed

The signatures are :mod:`qloraflow.minhash`'s. ``python benchmarks/dedupe.py 10000`` measures throughput against datasketch used as its
documentation shows.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np

from qloraflow.minhash import fmix64, minhash_by_kind, odd_multipliers, shared_lines

_U32, _U64 = np.uint32, np.uint64

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

_IN_PROCESS_BELOW = 5_000  # below this, forking a worker costs more than it saves
# (false positive, false negative) weights for datasketch's choice of bands: every candidate is
# verified, so a false positive costs a comparison while a false negative keeps a duplicate. At
# 0.8 / 128 permutations this gives 12 bands of 10 rows, which finds a pair at Jaccard 0.85 93% of
# the time (datasketch's default 9 x 13 finds it 69% of the time).
_LSH_WEIGHTS = (0.2, 0.8)
_PREFILTER = True  # offer the index only records that share a band (see shares_a_band); off to test it



@dataclass
class DedupeResult:
    """What happened to each input record, by position.

    Attributes:
        duplicate_of: Index of the kept record each removed one duplicates; -1 for kept records.
        reason: ``"exact_duplicate"``, ``"near_duplicate"`` or None (kept).
        similarity: Estimated Jaccard similarity to ``duplicate_of`` (1.0 for exact duplicates).
        lsh_params: ``(bands, rows)`` of the LSH index used.
        shared_lines: Distinct lines taken as shared text (see :func:`dedupe_texts`).
        records_with_shared_text: Records (after exact deduplication) holding a shared line.
        shared_text_merges: Records kept that comparing full texts would have removed as near
            duplicates: what the shared text alone would have merged.
    """

    duplicate_of: np.ndarray
    reason: list[Optional[str]]
    similarity: np.ndarray
    lsh_params: tuple[int, int] = (0, 0)
    shared_lines: int = 0
    records_with_shared_text: int = 0
    shared_text_merges: int = 0

    @property
    def kept(self) -> np.ndarray:
        return self.duplicate_of < 0


def band_keys(sigs: np.ndarray, hashranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(records, bands)`` uint64 keys: a hash of each LSH band's values (equal bands, equal keys)."""
    out = np.empty((len(sigs), len(hashranges)), dtype=_U64)
    for b, (lo, hi) in enumerate(hashranges):
        band = sigs[:, lo:hi].astype(_U64)
        out[:, b] = fmix64(band @ odd_multipliers(hi - lo, 1000) + _U64(b))  # the product wraps mod 2**64
    return out


def _fold(keys: np.ndarray) -> np.ndarray:
    """uint64 keys folded to the uint32 that salts a signature (XOR-linear: fold(a ^ b) = fold(a) ^ fold(b))."""
    return (keys ^ (keys >> _U64(32))).astype(_U32)


def _salted(numbers: np.ndarray, distinct: Optional[np.ndarray], distinct_numbers: bool) -> np.ndarray:
    """The keys that must match: number keys (when ``distinct_numbers``) XOR ``distinct_keys``."""
    if not distinct_numbers:
        numbers[:] = 0
    if distinct is not None:
        numbers ^= distinct
    return numbers


def _signature_chunk(args: tuple) -> tuple[np.ndarray, ...]:
    """Signatures salted by the keys that must match (number keys, ``distinct_keys``), has-shingles,
    those keys, and band keys if asked.

    The worker entry point: module level so it pickles.
    """
    texts, distinct, num_perm, shingle_size, seed, distinct_numbers, hashranges = args
    sigs, has, numbers, _ = minhash_by_kind(texts, num_perm, shingle_size, seed)
    numbers = _salted(numbers, distinct, distinct_numbers)
    sigs ^= _fold(numbers)[:, None]
    keys = band_keys(sigs, hashranges) if hashranges else np.empty((len(texts), 0), dtype=_U64)
    return sigs, has, numbers, keys


def _varying_chunk(args: tuple) -> tuple[np.ndarray, ...]:
    """For texts that may hold ``shared`` lines: the salted signatures of what varies and of the
    full text less its seams (see :func:`minhash_by_kind`; the full signature where no line is shared),
    and whether each text touches shared text. The worker entry point for those."""
    texts, distinct, num_perm, shingle_size, seed, distinct_numbers, shared = args
    full, _, numbers, parts = minhash_by_kind(texts, num_perm, shingle_size, seed, shared)
    salt = _fold(_salted(numbers, distinct, distinct_numbers))[:, None]
    if parts is None:
        full ^= salt
        return full, full, np.zeros(len(texts), dtype=bool)
    return parts[0] ^ salt, parts[1] ^ salt, parts[2]


def _signature_stream(fn, texts: Sequence[str], distinct: Optional[np.ndarray], args: tuple, num_workers: int,
                      chunk_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """``fn`` (:func:`_signature_chunk`, :func:`_varying_chunk`) over ``texts`` chunk by chunk, in
    order; in worker processes when asked.

    At most ``2 * num_workers + 1`` chunks are in flight, so memory stays bounded whatever the
    input size.
    """
    chunks = ((list(texts[i: i + chunk_size]), None if distinct is None else distinct[i: i + chunk_size])
              for i in range(0, len(texts), chunk_size))
    if num_workers < 1:
        for chunk in chunks:
            yield fn((*chunk, *args))
        return
    # fork where there is one: spawn and forkserver re-import the caller's __main__, so a script
    # without an `if __name__ == "__main__"` guard would start over in every worker. The workers
    # only run numpy on the texts they are sent and touch no lock the parent's threads may hold.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with cf.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, (*chunk, *args)))
            if len(pending) > 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_workers() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def shares_a_band(keys: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Per record: does one of its band keys occur in another record's too?

    A record that shares no band with any other can neither be returned by an LSH query nor get
    a candidate from one, so it is kept without touching the index. That is most records: only
    duplicates, their originals and chance band collisions remain (all verified as usual).
    """
    rows = np.flatnonzero(has)
    _, inverse, counts = np.unique(keys[rows].ravel(), return_inverse=True, return_counts=True)
    shared = np.zeros(len(keys), dtype=bool)
    shared[rows] = (counts[inverse] > 1).reshape(len(rows), keys.shape[1]).any(axis=1)
    return shared


class _NearDuplicateIndex:
    """The records kept so far: a ``datasketch.MinHashLSH``, and the signatures to verify with.

    Records are offered in order by position (the LSH key). Each is queried, its candidates
    verified, and it is either reported as a near duplicate or inserted.
    """

    def __init__(self, num_perm: int, threshold: float, seed: int, params: Optional[tuple[int, int]] = None):
        from datasketch import LeanMinHash, MinHashLSH  # lazy: scipy makes this a 1 s import

        self.signatures = np.empty((0, num_perm), dtype=_U32)
        self.check: Optional[np.ndarray] = None  # signatures a match must also reach the threshold on
        self.numbers = np.empty(0, dtype=_U64)
        # params: the (bands, rows) of another index, which spares optimising them again (20 ms)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS, params=params)
        self.threshold, self.seed = threshold, seed
        self._sketch_type = LeanMinHash

    def _sketch(self, hashvalues: np.ndarray):
        # LeanMinHash's constructor checks the values' range (a max and a min per record), which
        # costs as much as a query; these are the affine32 scheme's uint32 by construction.
        sketch = object.__new__(self._sketch_type)
        sketch.seed, sketch.scheme, sketch.hashvalues = self.seed, "affine32", hashvalues
        return sketch

    def offer(self, p: int) -> Optional[tuple[int, float]]:
        """``(kept position, similarity)`` when record ``p`` is a near duplicate, else None (inserted)."""
        sig = self.signatures[p]
        sketch = self._sketch(sig)
        best, best_sim = -1, -1.0
        for c in self.lsh.query(sketch):
            if self.numbers[c] != self.numbers[p]:
                continue  # the salts collided; the numbers still differ
            sim = np.count_nonzero(self.signatures[c] == sig) / len(sig)
            if (sim >= self.threshold and (sim > best_sim or (sim == best_sim and c < best))
                    and (self.check is None or self._check_similarity(c, p) >= self.threshold)):
                best, best_sim = c, sim
        if best >= 0:
            return best, best_sim
        self.lsh.insert(p, sketch, check_duplication=False)
        return None

    def _check_similarity(self, c: int, p: int) -> float:
        return np.count_nonzero(self.check[c] == self.check[p]) / self.check.shape[1]


def dedupe_texts(texts: Sequence[str], *, exact_keys: Optional[Sequence[Hashable]] = None,
                 threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 3,
                 distinct_numbers: bool = True, shared_line_records: int = 0,
                 distinct_keys: Optional[Sequence[int]] = None, num_workers: Optional[int] = None,
                 chunk_size: int = 500, seed: int = 1) -> DedupeResult:
    """Mark exact and near duplicates, keeping the first record of each cluster.

    Exact duplicates share ``exact_keys[i]`` (default: the text itself). The other records are
    MinHashed (in worker processes for large inputs); those that share an LSH band with another
    record are then offered in order to a ``datasketch.MinHashLSH`` of the records kept so far.
    Every candidate is verified with the Jaccard similarity estimated from the two full
    signatures (what ``MinHash.jaccard`` computes); the record is removed as a near duplicate of
    the most similar candidate at or above ``threshold`` (the earliest on ties), or kept and
    inserted. Removed records are never inserted, so ``duplicate_of`` always names a kept record.

    Shared text: with ``shared_line_records`` >= 2, a line that many records hold verbatim (a
    system prompt, a database schema, a template's fixed lines; see :func:`shared_lines`) is
    context, not content. The records that share a band are then compared on their shingles that
    touch no shared line (the index holds those signatures, so records that share only such text
    do not even meet), and a match must also reach ``threshold`` on the full texts less the seams
    between shared and other lines: leaving shared text out can only keep records that the full
    texts would merge, never merge records they keep apart (one question under two schemas is two
    examples). A record made only of shared lines is compared on its full text. Near copies of one
    another differ inside their lines, so they are found as before; what this misses is a cluster
    of more than ``shared_line_records`` multi-line copies each edited in another line (their
    untouched lines become shared text). ``shared_text_merges`` counts the records kept that the
    full texts alone would have removed (a second pass, on the same signatures).

    Args:
        texts: Normalised record texts, in priority order (earlier wins).
        exact_keys: Identity of each record for exact deduplication (e.g. a content hash).
        threshold: Jaccard similarity at or above which two records are near duplicates.
        num_perm: MinHash permutations.
        shingle_size: Words per shingle.
        distinct_numbers: When true, records whose digit-bearing words differ (templated examples
            such as "rows where age > 30" vs "> 31") are never near duplicates: their number key
            salts the signature, so they do not even meet in the index.
        shared_line_records: Records a line must be in to be shared text (< 2: compare full texts).
        distinct_keys: Per record, a uint64 key (0: none); records with different keys are never
            near duplicates (salted in like number keys). The data stage keys short answers.
        num_workers: Processes that compute signatures; 0: compute them here. Default: one per
            CPU, and 0 for inputs under 5,000 records (starting workers costs more than it saves).
        chunk_size: Records per worker task.
        seed: MinHash permutation seed.

    Returns:
        A :class:`DedupeResult` indexed like ``texts``.
    """
    result, unique = _exact_duplicates(texts if exact_keys is None else exact_keys)
    kept = [texts[i] for i in unique]
    distinct = _rows(distinct_keys, unique)
    index = _NearDuplicateIndex(num_perm, threshold, seed)
    # Pass 1: signatures and band keys of every remaining record, on all CPUs.
    signatures, has, numbers, keys = _signatures(
        kept, distinct, (num_perm, shingle_size, seed, distinct_numbers, index.lsh.hashranges), num_workers, chunk_size)
    shared = shared_lines(kept, shared_line_records)
    return _decide(result, unique, index, signatures, has, numbers, keys,
                   _SharedText(shared, kept, distinct, (shingle_size, distinct_numbers), num_workers, chunk_size))


def record_signatures(texts: Sequence[str], *, num_perm: int = 128, shingle_size: int = 3,
                      distinct_numbers: bool = True, num_workers: Optional[int] = None, chunk_size: int = 500,
                      seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-record half of :func:`dedupe_texts`: what :func:`dedupe_signatures` decides from.

    Each row depends on its own text only, so the rows of a large input can be computed in
    pieces, anywhere, and stacked (the sharded data stage does that). Arguments as in
    :func:`dedupe_texts`.

    Returns:
        ``(signatures, has_shingles, number_keys)``: ``(len(texts), num_perm)`` uint32 signatures
        (salted by the number keys when ``distinct_numbers``), and per text whether it has a
        shingle and its uint64 number key (0 unless ``distinct_numbers``).
    """
    signatures, has, numbers, _ = _signatures(
        texts, None, (num_perm, shingle_size, seed, distinct_numbers, None), num_workers, chunk_size)
    return signatures, has, numbers


def dedupe_signatures(exact_keys: Sequence[Hashable], signatures: np.ndarray, has: np.ndarray,
                      numbers: np.ndarray, *, threshold: float = 0.8, seed: int = 1,
                      distinct_keys: Optional[Sequence[int]] = None, texts: Optional[Sequence[str]] = None,
                      shared_line_records: int = 0, shingle_size: int = 3, distinct_numbers: bool = True,
                      num_workers: Optional[int] = None) -> DedupeResult:
    """:func:`dedupe_texts` from :func:`record_signatures` of the same texts: the same result.

    Shared lines need every record's text: with ``texts`` and ``shared_line_records``, the
    signatures of what varies are computed here, for the records that share a band.

    Args:
        exact_keys: Identity of each record for exact deduplication, in priority order.
        signatures: ``record_signatures(texts)[0]``, a row per record (exact duplicates' rows are
            not read).
        has: ``record_signatures(texts)[1]``.
        numbers: ``record_signatures(texts)[2]``.
        threshold: Jaccard similarity at or above which two records are near duplicates.
        seed: The MinHash permutation seed the signatures were made with.
        distinct_keys, shared_line_records: As in :func:`dedupe_texts`.
        texts: The records' texts (needed for shared lines).
        shingle_size, distinct_numbers: What the signatures were made with.
        num_workers: Processes for the signatures of what varies.

    Returns:
        A :class:`DedupeResult` indexed like ``exact_keys``.
    """
    result, unique = _exact_duplicates(exact_keys)
    index = _NearDuplicateIndex(signatures.shape[1], threshold, seed)
    rows = np.asarray(unique, dtype=np.int64)
    kept_signatures, has, numbers = signatures[rows], has[rows], numbers[rows]  # copies: salted below
    distinct = _rows(distinct_keys, unique)
    if distinct is not None:
        numbers ^= distinct
        kept_signatures ^= _fold(distinct)[:, None]
    kept = [texts[i] for i in unique] if texts is not None else []
    shared = shared_lines(kept, shared_line_records)
    return _decide(result, unique, index, kept_signatures, has, numbers,
                   band_keys(kept_signatures, index.lsh.hashranges),
                   _SharedText(shared, kept, distinct, (shingle_size, distinct_numbers), num_workers, 500))


def _rows(keys: Optional[Sequence[int]], unique: list[int]) -> Optional[np.ndarray]:
    return None if keys is None else np.asarray(keys, dtype=_U64)[np.asarray(unique, dtype=np.int64)]


def _exact_duplicates(keys: Sequence[Hashable]) -> tuple[DedupeResult, list[int]]:
    """Every record marked against the first with its key; and the positions of those firsts."""
    n = len(keys)
    result = DedupeResult(np.full(n, -1, dtype=np.int64), [None] * n, np.zeros(n, dtype=np.float32))
    first: dict[Hashable, int] = {}
    unique: list[int] = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            result.duplicate_of[i], result.reason[i], result.similarity[i] = j, EXACT_DUPLICATE, 1.0
        else:
            unique.append(i)
    return result, unique


def _signatures(texts: Sequence[str], distinct: Optional[np.ndarray], args: tuple, num_workers: Optional[int],
                chunk_size: int, fn=_signature_chunk) -> tuple[np.ndarray, ...]:
    """``fn`` over all ``texts``, stacked: in worker processes for large inputs.

    :func:`_signature_chunk`: ``(signatures, has, numbers, band keys)``; :func:`_varying_chunk`:
    ``(varying, unseamed, touches)``.
    """
    num_perm, n = args[0], len(texts)
    if fn is _signature_chunk:
        hashranges = args[-1]
        arrays = (np.empty((n, num_perm), dtype=_U32), np.zeros(n, dtype=bool), np.zeros(n, dtype=_U64),
                  np.empty((n, len(hashranges) if hashranges else 0), dtype=_U64))
    else:
        arrays = (np.empty((n, num_perm), dtype=_U32), np.empty((n, num_perm), dtype=_U32), np.zeros(n, dtype=bool))
    workers = default_workers() if num_workers is None else num_workers
    if n < _IN_PROCESS_BELOW:
        workers = 0
    pos = 0
    for chunk in _signature_stream(fn, texts, distinct, args, workers, chunk_size):
        for array, part in zip(arrays, chunk):
            array[pos: pos + len(part)] = part
        pos += len(chunk[0])
    return arrays


@dataclass
class _SharedText:
    """What :func:`_decide` needs to compare records on what varies: the shared lines, the texts
    (after exact deduplication), their ``distinct_keys``, and how to make signatures."""

    lines: frozenset[bytes]
    texts: Sequence[str]
    distinct: Optional[np.ndarray]
    options: tuple[int, bool]  # shingle_size, distinct_numbers
    num_workers: Optional[int]
    chunk_size: int


def _decide(result: DedupeResult, unique: list[int], index: _NearDuplicateIndex, signatures: np.ndarray,
            has: np.ndarray, numbers: np.ndarray, keys: np.ndarray, shared: _SharedText) -> DedupeResult:
    """Pass 2 on the full texts' signatures; with shared lines, on what varies instead.

    Only records that share a band of their full signatures can be or have a duplicate (the
    prefilter of pass 2), so only theirs are made again without the shared lines; the others'
    rows stay as they are. The full-text pass runs as well, to count what it would have removed.
    """
    if not shared.lines:
        return _near_duplicates(result, unique, index, signatures, has, numbers, keys)
    alone = DedupeResult(result.duplicate_of.copy(), list(result.reason), result.similarity.copy())  # exact only
    candidates = shares_a_band(keys, has) if _PREFILTER else has
    rows = np.flatnonzero(candidates)
    varying, unseamed, _ = _signatures(
        [shared.texts[r] for r in rows.tolist()], None if shared.distinct is None else shared.distinct[rows],
        (signatures.shape[1], shared.options[0], index.seed, shared.options[1], shared.lines),
        shared.num_workers, shared.chunk_size, fn=_varying_chunk)
    compare, index.check = signatures.copy(), signatures.copy()
    compare[rows], index.check[rows] = varying, unseamed
    compare_keys = keys.copy()
    compare_keys[rows] = band_keys(varying, index.lsh.hashranges)
    _near_duplicates(result, unique, index, compare, candidates, numbers, compare_keys)
    result.shared_lines = len(shared.lines)
    result.records_with_shared_text = _count_with_shared_lines(shared.texts, shared.lines)
    kept = result.kept[np.asarray(unique, dtype=np.int64)]
    if _follows_a_band_mate(keys, candidates, kept):
        _near_duplicates(alone, unique, _NearDuplicateIndex(signatures.shape[1], index.threshold, index.seed,
                                                            (index.lsh.b, index.lsh.r)), signatures, has, numbers, keys)
        result.shared_text_merges = sum(r is None and a == NEAR_DUPLICATE for r, a in zip(result.reason, alone.reason))
    return result


def _follows_a_band_mate(keys: np.ndarray, candidates: np.ndarray, kept: np.ndarray) -> bool:
    """Does a kept candidate share a band with an earlier candidate? If not, comparing full texts
    could not have removed any record that is kept (a removal needs an earlier match in a shared
    band), and the full-text pass that counts those can be skipped."""
    rows = np.flatnonzero(candidates)
    for b in range(keys.shape[1]):
        _, first, inverse = np.unique(keys[rows, b], return_index=True, return_inverse=True)
        if (kept[rows] & (first[inverse] < np.arange(len(rows)))).any():
            return True
    return False


def _count_with_shared_lines(texts: Sequence[str], shared: frozenset[bytes]) -> int:
    lines = {line.decode("utf-8", "surrogatepass") for line in shared}
    return sum(any(line in lines for line in text.lower().split("\n")) for text in texts)


def _near_duplicates(result: DedupeResult, unique: list[int], index: _NearDuplicateIndex, signatures: np.ndarray,
                     has: np.ndarray, numbers: np.ndarray, keys: np.ndarray) -> DedupeResult:
    """Pass 2, in order, over the records left by exact deduplication (``unique``, and their rows)."""
    duplicate_of, reason, similarity = result.duplicate_of, result.reason, result.similarity
    index.signatures, index.numbers = signatures, numbers
    # Only records that share a band with another can be or have a duplicate.
    for p in np.flatnonzero(shares_a_band(keys, has) if _PREFILTER else has).tolist():
        found = index.offer(p)
        if found:
            i = unique[p]
            duplicate_of[i], reason[i], similarity[i] = unique[found[0]], NEAR_DUPLICATE, found[1]
    # An exact copy of a record removed as a near duplicate is a near duplicate of the kept one.
    for i in np.flatnonzero(duplicate_of >= 0):
        j = duplicate_of[i]
        if reason[j] == NEAR_DUPLICATE:
            duplicate_of[i], reason[i], similarity[i] = duplicate_of[j], NEAR_DUPLICATE, similarity[j]
    result.lsh_params = (index.lsh.b, index.lsh.r)
    return result
