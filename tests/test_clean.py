"""Text normalisation, PII placeholders and the per-record checks."""

from __future__ import annotations

import pytest

from qloraflow.clean import check_messages, clean_messages, clean_text, redact_pii, repetition_share

LIMITS = dict(min_output_chars=1, max_chars=200, max_repetition=0.5)


def chat(user: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("raw, clean", [
    ("\ufeffHello", "Hello"),  # BOM
    ("line one\r\nline two\rline three", "line one\nline two\nline three"),  # CRLF and CR
    ("ＳＥＬＥＣＴ　１２３", "SELECT 123"),  # full-width letters, digits and space (NFKC)
    ("ﬁne café", "fine café"),  # ligature decomposed, composed accent kept
    ("a \t  b\u00a0\u00a0c", "a b c"),  # runs of spaces, tabs and no-break spaces fold
    ("  padded  \n\n  ", "padded"),  # ends stripped
    ("bell\x07 nul\x00 esc\x1b[0m del\x7f zws\u200b", "bell nul esc[0m del zws"),  # controls go
    ("para one\n\n\npara two", "para one\n\n\npara two"),  # newlines are content
    ("def f():\n    return 1   \n\treturn 2", "def f():\n    return 1\n\treturn 2"),  # indentation stays
    ("x\u2028y\x85z", "x\ny\nz"),  # Unicode line breaks become LF
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_is_idempotent():
    text = "ＡＢＣ  \r\n\t  x\u3000 y \ufeff"
    assert clean_text(clean_text(text)) == clean_text(text) == "ABC\n\t  x y"  # indentation kept


def test_redact_pii_replaces_emails_and_phones_only():
    text = ("Mail jane.doe+ml@example.co.uk or call +1 (555) 123-4567, 555-123-4567 or +44 20 7946 0958. "
            "Released 2024-01-15 as v1.2.3 on 192.168.1.10; 12 345 users; order 5551234.")
    assert redact_pii(text) == (
        "Mail [EMAIL] or call [PHONE], [PHONE] or [PHONE]. "
        "Released 2024-01-15 as v1.2.3 on 192.168.1.10; 12 345 users; order 5551234.")


def test_clean_messages_redacts_when_asked():
    msgs = chat("write to bob@mail.org", "ok,  done")
    assert clean_messages(msgs)[0]["content"] == "write to bob@mail.org"
    assert clean_messages(msgs, redact=True) == chat("write to [EMAIL]", "ok, done")


def test_repetition_share():
    assert repetition_share("yes yes yes yes yes") == pytest.approx(4 / 5)  # all but the first "yes"
    assert repetition_share("buy now " * 30) == pytest.approx(58 / 60)  # all but "buy now" and the next "buy"
    assert repetition_share("the quick brown fox jumps over the lazy dog") == 0.0
    assert repetition_share("ok ok ok") == 0.0  # one 3-gram: nothing repeats
    # "a b c" again in 10 words: its second occurrence is 3 of them
    assert repetition_share("a b c x a b c y z w") == pytest.approx(3 / 10)
    assert repetition_share("") == 0.0


SENTENCE = "The model kept writing this very same sentence."


@pytest.mark.parametrize("text", [
    "the " * 40,                          # a one-word loop
    " ".join([SENTENCE] * 10),            # a sentence said 10 times (the most frequent 3-gram covers 3 of 8 words)
    " ".join([SENTENCE] * 3),             # three times is already more than half repeated
    "Sure! " + "Here is the answer: 42. " * 6,
    "la la la la la",
])
def test_degenerate_loops_are_rejected(text):
    assert repetition_share(text) > 0.5
    assert check_messages(chat("q", text), **{**LIMITS, "max_chars": 2000})[0] == "repetitive"


@pytest.mark.parametrize("text", [
    "SELECT state FROM Owners INTERSECT SELECT state FROM Professionals",   # rejected before (67%)
    "SELECT template_id FROM Templates EXCEPT SELECT template_id FROM Documents",
    "SELECT name FROM a UNION SELECT name FROM b UNION SELECT name FROM c",
    "SELECT T1.name FROM people AS T1 JOIN pets AS T2 ON T1.id = T2.owner WHERE T2.kind = 'cat' INTERSECT "
    "SELECT T1.name FROM people AS T1 JOIN pets AS T2 ON T1.id = T2.owner WHERE T2.kind = 'dog'",
    " ".join([SENTENCE] * 2),             # said twice: at most half of it repeats
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 2",
])
def test_queries_and_code_that_reuse_a_clause_are_not_repetitive(text):
    assert repetition_share(text) <= 0.5
    assert check_messages(chat("q", text), **{**LIMITS, "max_chars": 2000}) is None


@pytest.mark.parametrize("messages, reason", [
    (chat("q", "a"), None),
    (chat("q", ""), "empty_output"),
    (chat("", "a"), "empty_field"),
    (chat("q", "a", system=""), "empty_field"),
    (chat("q" * 150, "a" * 51), "too_long"),
    (chat("q", "spam " * 20), "repetitive"),
    (chat("q\ud800", "a"), "bad_encoding"),
    ([{"role": "assistant", "content": "completion text"}], None),
])
def test_check_messages(messages, reason):
    problem = check_messages(messages, **LIMITS)
    assert (problem[0] if problem else None) == reason


def test_check_messages_details_name_the_setting():
    assert check_messages(chat("q", "ab"), **{**LIMITS, "min_output_chars": 5}) == (
        "empty_output", "turn 2 (assistant) has 2 characters after cleaning; data.min_output_chars is 5")
    assert "data.max_chars is 200" in check_messages(chat("q" * 300, "a"), **LIMITS)[1]
    assert "data.max_repetition is 0.5" in check_messages(chat("q", "la la la la la"), **LIMITS)[1]


def test_token_limit_applies_only_with_a_count():
    assert check_messages(chat("q", "a"), **LIMITS, max_tokens=10) is None
    assert check_messages(chat("q", "a"), **LIMITS, n_tokens=10, max_tokens=10) is None
    reason, detail = check_messages(chat("q", "a"), **LIMITS, n_tokens=11, max_tokens=10)
    assert reason == "too_long" and "11 tokens" in detail
