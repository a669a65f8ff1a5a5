"""Shingling, datasketch-compatible signatures and duplicate removal."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from qloraflow import dedupe
from qloraflow.dedupe import (EXACT_DUPLICATE, NEAR_DUPLICATE, dedupe_texts, jaccard, minhash_signatures,
                              permutations, shingle_hashes)

_rng = random.Random(7)
VOCAB = sorted({"".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 9)))
                for _ in range(3000)})


def make_text(seed: int, words: int = 150) -> str:
    return " ".join(random.Random(seed).choices(VOCAB, k=words))


def change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for p in positions:
        words[p] = "zzchanged"
    return " ".join(words)


def test_permutations_match_datasketch():
    for num_perm, seed in ((128, 1), (64, 7)):
        a, b = permutations(num_perm, seed)
        ref = MinHash(num_perm=num_perm, seed=seed).permutations
        assert np.array_equal(a, ref[0]) and np.array_equal(b, ref[1])


def test_signatures_equal_datasketch_minhash():
    texts = [make_text(1), "Hello, World! hello world", "one", "", "?!",
             "Ünïcödé wörds 漢字 mixed with ASCII 42", "a b", make_text(2, 7)]
    hashes, offsets, _ = shingle_hashes(texts, 3)
    sigs, has, _ = minhash_signatures(texts, num_perm=128, shingle_size=3)
    for i in range(len(texts)):
        folded = [int(h ^ (h >> np.uint64(32))) & 0xFFFFFFFF for h in hashes[offsets[i]: offsets[i + 1]]]
        ref = MinHash(num_perm=128, hashfunc=int)
        ref.update_batch(folded)
        assert np.array_equal(sigs[i], ref.hashvalues), texts[i]
        assert has[i] == bool(folded)


def test_shingles_ignore_case_and_punctuation_but_not_order():
    (h1, o1, _), (h2, _, _), (h3, _, _) = (shingle_hashes([t]) for t in
                                           ("The cat, the hat.", "the CAT the hat", "hat the the cat"))
    assert np.array_equal(h1, h2) and len(h1) == 2
    assert not set(h1.tolist()) & set(h3.tolist())
    _, offsets, _ = shingle_hashes(["", "one", "one two", "one two three", "!!"], 3)
    assert np.diff(offsets).tolist() == [0, 1, 1, 1, 0]  # short texts get one shingle of all their words


def test_number_keys_follow_the_numbers():
    _, _, keys = shingle_hashes(["rows where age > 30", "rows where age > 31", "rows where age > 30",
                                 "no digits here", "30 then 31", "31 then 30"])
    assert keys[0] == keys[2] != keys[1]
    assert keys[3] == 0
    assert keys[4] != keys[5]  # order matters


def test_jaccard_is_exact():
    assert jaccard("a b c d", "a b c e") == pytest.approx(1 / 3)
    assert jaccard("same words", "Same, words!") == 1.0
    assert jaccard("", "") == 1.0


def build_corpus() -> tuple[list[str], dict[int, tuple[str, int]]]:
    """Texts, and for each one that must go: (reason, index of the kept one)."""
    texts: list[str] = []
    expect: dict[int, tuple[str, int]] = {}
    for base in range(20):
        texts.append(make_text(100 + base))
        original = len(texts) - 1
        if base % 4 == 0:
            texts.append(change_words(texts[original], [50]))  # one word changed
            expect[len(texts) - 1] = (NEAR_DUPLICATE, original)
        if base % 4 == 1:
            texts.append(change_words(texts[original], [20, 100]))  # two words changed
            expect[len(texts) - 1] = (NEAR_DUPLICATE, original)
        if base % 4 == 2:
            texts.append(texts[original])
            expect[len(texts) - 1] = (EXACT_DUPLICATE, original)
    # Templated records: long, identical but for one number. All distinct examples.
    template = make_text(999, 60)
    for n in (3, 4, 5, 40):
        texts.append(f"{template} how many rows have a value above {n} ?")
    return texts, expect


def check(result, expect: dict[int, tuple[str, int]], n: int) -> None:
    got = {i: (result.reason[i], int(result.duplicate_of[i])) for i in range(n) if not result.kept[i]}
    assert got == expect
    for i, (reason, _) in expect.items():
        assert result.similarity[i] >= (1.0 if reason == EXACT_DUPLICATE else 0.8)


def test_dedupe_removes_copies_and_keeps_templated_records():
    texts, expect = build_corpus()
    result = dedupe_texts(texts, threshold=0.8, num_perm=128, shingle_size=3)
    check(result, expect, len(texts))
    assert result.lsh_params == (12, 10)  # tuned for recall: candidates are verified


def test_dedupe_keeps_the_first_of_each_cluster():
    texts, expect = build_corpus()
    order = list(range(len(texts)))[::-1]
    result = dedupe_texts([texts[i] for i in order])
    new_pos = {old: new for new, old in enumerate(order)}
    # Reversed, the copy comes first and is the one kept; the original points to it.
    reversed_expect = {new_pos[kept]: (reason, new_pos[copy]) for copy, (reason, kept) in expect.items()}
    check(result, reversed_expect, len(texts))


def test_numbers_can_be_ignored():
    texts, expect = build_corpus()
    result = dedupe_texts(texts, distinct_numbers=False)
    templated = list(range(len(texts) - 4, len(texts)))
    assert [result.reason[i] for i in templated] == [None, NEAR_DUPLICATE, NEAR_DUPLICATE, NEAR_DUPLICATE]
    assert [int(result.duplicate_of[i]) for i in templated[1:]] == [templated[0]] * 3


def test_exact_keys_decide_exact_duplicates():
    texts = [make_text(1), make_text(2), make_text(1)]
    result = dedupe_texts(texts, exact_keys=["k1", "k1", "k3"])
    assert result.reason == [None, EXACT_DUPLICATE, NEAR_DUPLICATE]
    assert result.duplicate_of.tolist() == [-1, 0, 0]


def test_texts_without_words_are_only_exact_deduplicated():
    result = dedupe_texts(["!!!", "???", "!!!"])
    assert result.reason == [None, None, EXACT_DUPLICATE]


def test_worker_processes_give_the_same_answer(monkeypatch):
    texts, expect = build_corpus()
    monkeypatch.setattr(dedupe, "_IN_PROCESS_BELOW", 0)
    result = dedupe_texts(texts, num_workers=2, chunk_size=7)
    check(result, expect, len(texts))


def test_band_prefilter_changes_nothing(monkeypatch):
    texts, expect = build_corpus()
    copies = texts[::3]
    texts = texts + copies  # exact copies too, and clusters that span chunks
    with_filter = dedupe_texts(texts, chunk_size=5)
    monkeypatch.setattr(dedupe, "_PREFILTER", False)
    without = dedupe_texts(texts, chunk_size=5)
    assert with_filter.reason == without.reason
    assert with_filter.duplicate_of.tolist() == without.duplicate_of.tolist()
    assert sum(r is not None for r in with_filter.reason) == len(expect) + len(copies)


def test_a_copy_of_a_removed_record_points_to_the_kept_one():
    original = make_text(5)
    near = change_words(original, [75])
    result = dedupe_texts([original, near, near, make_text(6)])
    assert result.reason == [None, NEAR_DUPLICATE, NEAR_DUPLICATE, None]
    assert result.duplicate_of.tolist() == [-1, 0, 0, -1]
    assert result.similarity[2] == result.similarity[1] < 1.0
