"""Shingling, datasketch-compatible signatures and duplicate removal."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from qloraflow import dedupe, minhash
from qloraflow.dedupe import EXACT_DUPLICATE, NEAR_DUPLICATE, dedupe_texts
from qloraflow.minhash import jaccard, minhash_signatures, permutations, shingle_hashes

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


# ----------------------------------------------------------------------------------------------
# Shared text: lines that many records hold (a system prompt, a schema) are context, not content.

SYSTEM_PROMPT = "\n".join(make_text(900 + k, 25) for k in range(8))  # 200 words over 8 lines, in every record
QUESTIONS = [f"{make_text(700 + i, 6)}?" for i in range(40)]
ANSWERS = [make_text(800 + i, 5) for i in range(40)]


def prompted(question: str, answer: str, prompt: str = SYSTEM_PROMPT) -> str:
    return f"{prompt}\n{question}\n{answer}"


def test_a_shared_system_prompt_does_not_make_records_copies():
    texts = [prompted(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    full = dedupe_texts(texts)
    assert sum(r == NEAR_DUPLICATE for r in full.reason) >= 30  # the prompt alone: Jaccard ~0.8-0.9

    result = dedupe_texts(texts, shared_line_records=10)
    assert result.reason == [None] * len(texts)
    assert result.shared_lines == 8 and result.records_with_shared_text == len(texts)
    assert result.shared_text_merges == sum(r == NEAR_DUPLICATE for r in full.reason)


def test_near_copies_are_still_caught_beside_shared_text():
    texts = [prompted(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    body = make_text(5, 60)
    texts += [prompted("Summarise this.", body), prompted("Summarise this.", change_words(body, [30])),
              body, change_words(body, [10, 40])]  # a pair with the prompt, and one without it
    result = dedupe_texts(texts, shared_line_records=10)
    n = len(QUESTIONS)
    assert {i: (r, int(result.duplicate_of[i])) for i, r in enumerate(result.reason) if r} == {
        n + 1: (NEAR_DUPLICATE, n), n + 3: (NEAR_DUPLICATE, n + 2)}
    assert result.similarity[n + 1] >= 0.8


def test_short_varying_texts_that_differ_in_a_word_are_different_examples():
    # Two 6-word questions that differ in one word, same prompt, same answer: 3 of the question's 4
    # shingles differ, so what varies is ~0.6 similar and both are kept (a different question,
    # even if this answer happens to fit both). Case and punctuation are no difference at all.
    texts = [prompted(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    texts += [prompted("How many singers are from France?", "SELECT count(*) FROM singer WHERE country = 'x'"),
              prompted("How many singers are from Spain?", "SELECT count(*) FROM singer WHERE country = 'x'"),
              prompted("how many singers are from spain", "SELECT count(*) FROM singer WHERE country = 'x'")]
    result = dedupe_texts(texts, shared_line_records=10)
    n = len(QUESTIONS)
    assert result.reason[n: n + 2] == [None, None]
    assert (result.reason[n + 2], int(result.duplicate_of[n + 2])) == (NEAR_DUPLICATE, n + 1)


def test_the_same_question_under_another_shared_text_is_not_a_copy():
    # Leaving shared text out never merges what the full texts keep apart: one question asked
    # against two schemas is two examples.
    other_prompt = "\n".join(make_text(950 + k, 25) for k in range(8))
    texts = [prompted(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    texts += [prompted(q, a, other_prompt) for q, a in zip(QUESTIONS[:12], ANSWERS[:12])]
    result = dedupe_texts(texts, shared_line_records=10)
    assert result.reason == [None] * len(texts)
    assert result.shared_lines == 16


def test_shared_lines_count_records_not_occurrences():
    assert minhash.shared_lines(["a b\nc", "A B\nd", "x\nx\nx"], 2) == {b"a b"}
    assert minhash.shared_lines(["same line"] * 5, 6) == frozenset()
    assert minhash.shared_lines([");\n)", ");", ");"], 2) == frozenset()  # no word: nothing to leave out
    assert minhash.shared_lines(["a\nb"] * 5, 0) == frozenset()


def test_signatures_of_what_varies_equal_datasketch_minhash():
    texts = [prompted(QUESTIONS[0], ANSWERS[0]), prompted(QUESTIONS[1], ANSWERS[1]), SYSTEM_PROMPT,
             "no shared line here at all", f"{QUESTIONS[2]}\n{SYSTEM_PROMPT}"]
    shared = minhash.shared_lines(texts[:3], 3)
    assert len(shared) == 8
    hashes, offsets, _, kind = minhash._shingles(texts, 3, shared)
    full, _, _, (varying, unseamed, touches) = minhash.minhash_by_kind(texts, 128, 3, 1, shared)
    assert touches.tolist() == [True, True, True, False, True]
    for i in range(len(texts)):
        h, k = hashes[offsets[i]: offsets[i + 1]], kind[offsets[i]: offsets[i + 1]]

        def reference(keep):
            ref = MinHash(num_perm=128, hashfunc=int)
            ref.update_batch([int(v ^ (v >> np.uint64(32))) & 0xFFFFFFFF for v in h[keep]])
            return ref.hashvalues

        assert np.array_equal(full[i], reference(np.ones(len(h), dtype=bool)))
        if (k == minhash.VARYING).any():
            assert np.array_equal(varying[i], reference(k == minhash.VARYING))
            assert np.array_equal(unseamed[i], reference(k != minhash.SEAM))
        else:  # only shared text: compared on the full text
            assert np.array_equal(varying[i], full[i]) and np.array_equal(unseamed[i], full[i])
    assert (kind[offsets[3]: offsets[4]] == minhash.VARYING).all()
    assert (kind[offsets[2]: offsets[3]] == minhash.SHARED).all()
    assert (kind[offsets[0]: offsets[1]] == minhash.SEAM).sum() == 2  # "...prompt's last words | question"


def test_short_text_keys_compare_words_only():
    keys = minhash.short_text_keys(["SELECT name FROM t;", "select  name from T", "SELECT age FROM t",
                                   "", make_text(1, 40)], 32)
    assert keys[0] == keys[1] != keys[2]
    assert keys[3] == keys[4] == 0  # empty, and too long to need it


def test_distinct_keys_keep_near_copies_with_other_short_answers_apart():
    body = make_text(9, 100)
    texts = [f"{body}\nSELECT T2.name FROM Likes AS T1", f"{change_words(body, [20])}\nSELECT T2.name FROM Friend AS T1",
             f"{change_words(body, [30])}\nSELECT T2.name FROM Likes AS T1"]
    assert dedupe_texts(texts).reason == [None, NEAR_DUPLICATE, NEAR_DUPLICATE]
    keys = minhash.short_text_keys([t.split("\n")[1] for t in texts], 32)
    assert dedupe_texts(texts, distinct_keys=keys).reason == [None, None, NEAR_DUPLICATE]


def shared_corpus() -> tuple[list[str], list[int]]:
    texts = [prompted(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    body = make_text(5, 60)
    texts += [prompted("Summarise this.", body), prompted("Summarise this.", change_words(body, [30])),
              prompted(QUESTIONS[3], ANSWERS[3])]
    corpus, _ = build_corpus()
    texts += corpus
    keys = minhash.short_text_keys([t.rsplit("\n", 1)[-1] for t in texts], 8)
    return texts, [0] * 20 + keys[20:]  # the first 20 records are told apart by what varies alone


def test_shared_text_in_workers_and_from_stored_signatures_gives_the_same_answer(monkeypatch):
    texts, keys = shared_corpus()
    options = dict(shared_line_records=10, distinct_keys=keys)
    here = dedupe_texts(texts, **options, num_workers=0)
    assert sum(r is not None for r in here.reason) > 10 and here.shared_text_merges > 10
    monkeypatch.setattr(dedupe, "_IN_PROCESS_BELOW", 0)
    workers = dedupe_texts(texts, **options, num_workers=2, chunk_size=7)
    sigs, has, numbers = dedupe.record_signatures(texts, num_workers=0)
    stored = dedupe.dedupe_signatures(texts, sigs, has, numbers, texts=texts, **options)
    for other in (workers, stored):
        assert other.reason == here.reason
        assert other.duplicate_of.tolist() == here.duplicate_of.tolist()
        assert (other.shared_lines, other.records_with_shared_text, other.shared_text_merges) == (
            here.shared_lines, here.records_with_shared_text, here.shared_text_merges)


def test_skipping_the_full_text_pass_changes_no_count(monkeypatch):
    # Template lines on every record and planted copies after their originals: no kept record
    # follows a band mate, so the full-text pass is skipped; run anyway, it counts no merge either.
    lines = ["Summarise the following text", "Explain the passage below to a beginner"]
    texts, expect = build_corpus()
    texts = [f"{lines[i % 2]}\n{t}" for i, t in enumerate(texts)] + [f"{lines[0]}\n{make_text(3000 + i)}"
                                                                     for i in range(20)]
    calls = []
    real = dedupe._near_duplicates
    monkeypatch.setattr(dedupe, "_near_duplicates", lambda *a: calls.append(1) or real(*a))
    skipped = dedupe_texts(texts, shared_line_records=10)
    assert skipped.shared_lines == 2 and len(calls) == 1
    monkeypatch.setattr(dedupe, "_follows_a_band_mate", lambda *a: True)
    forced = dedupe_texts(texts, shared_line_records=10)
    assert len(calls) == 3
    assert skipped.reason == forced.reason and skipped.shared_text_merges == forced.shared_text_merges == 0
    assert sum(r is not None for r in skipped.reason) == len(expect)
