"""Normalise record text and decide which records are fit to train on.

Cleaning never rejects: it rewrites text (NFKC, line endings, control characters, whitespace,
optional PII placeholders). Checking rejects, with a reason code and a message that names the
``data.*`` setting to change::

    from qloraflow.clean import clean_messages, check_messages
    messages = clean_messages(record.messages, redact=cfg.redact_pii)
    problem = check_messages(messages, min_output_chars=1, max_chars=20000, max_repetition=0.5)
    if problem:
        reason, detail = problem
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional, Sequence

# C0/C1 controls except \t and \n, the BOM and the zero-width space: invisible, and they split
# tokens in ways no prompt at inference time will.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff\u200b]")
_LINE_BREAKS = re.compile("\r\n|[\r\x85\u2028\u2029]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t]+(?=\S)")  # leading indentation is not "inner": code keeps it
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)

EMAIL_PLACEHOLDER = "[EMAIL]"
PHONE_PLACEHOLDER = "[PHONE]"
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# Groups of digits joined by spaces, dots or dashes, optionally +country and (area); the digit
# count decides (see _phone) so that dates, versions and IP addresses stay.
_PHONE = re.compile(r"(?<![\w+])(\+\d{1,3}[ .-]?)?(\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,5}(?![\w])")


def clean_text(text: str) -> str:
    """Normalise one string for training.

    NFKC (full-width letters and digits become ASCII, compatibility spaces become spaces), CRLF
    and CR become LF, control characters and BOMs go, runs of spaces and tabs inside a line fold
    to one space (indentation at the start of a line stays, so code keeps its shape), spaces at
    line ends and at both ends of the text go. Newlines are kept as they are.

    Args:
        text: Any string.

    Returns:
        The cleaned string.
    """
    # Each rewrite is guarded by a substring test: most text needs none of them, and the tests
    # cost a tenth of a regex pass over it.
    if "\r" in text or "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = _LINE_BREAKS.sub("\n", text)
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("", text)
    if "  " in text or "\t" in text:
        text = _INNER_SPACE.sub(" ", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("", text)
    return text.strip()


def _phone(match: re.Match) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    marked = bool(match.group(1) or match.group(2))
    return PHONE_PLACEHOLDER if (10 <= digits <= 15 or (marked and 9 <= digits <= 15)) else match.group(0)


def redact_pii(text: str) -> str:
    """Replace e-mail addresses by ``[EMAIL]`` and phone numbers by ``[PHONE]``.

    A phone number is 10 to 15 digits in groups (9 with a ``+country`` or ``(area)`` prefix), so
    dates, version numbers, IP addresses and plain figures are left alone.
    """
    return _PHONE.sub(_phone, _EMAIL.sub(EMAIL_PLACEHOLDER, text))


def clean_messages(messages: Sequence[dict[str, str]], redact: bool = False) -> list[dict[str, str]]:
    """:func:`clean_text` (and :func:`redact_pii` when asked) on every turn's content."""
    out = []
    for m in messages:
        content = clean_text(m["content"])
        out.append({"role": m["role"], "content": redact_pii(content) if redact else content})
    return out


def repetition_share(text: str) -> float:
    """Share of a text's words that repeat it: they lie in a word 3-gram that occurred before.

    Words are split at whitespace and lowercased (punctuation stays attached: this measures
    copy-paste loops, not style). Each occurrence of a 3-gram after its first marks its three words;
    the share is the marked words over all words. It is the share of the text that says again what
    the text already said, so:

    - anything said at most twice is at most half repeated (the second copy): 0.5 (the default
      ``data.max_repetition``) never rejects a query that uses one clause twice, such as
      ``SELECT state FROM Owners INTERSECT SELECT state FROM Professionals`` (0.33), a
      ``UNION`` of three ``SELECT name FROM ...`` (0.43), or a short answer that restates the
      question's words;
    - a loop is caught whatever its period and length: "yes yes yes yes yes" is 0.8, "buy now"
      said 30 times 0.97, a seven-word sentence said 3 times 0.67 and 10 times 0.9.

    0.0 for texts with fewer than four words (no 3-gram can occur twice).
    """
    words = text.lower().split()
    seen: set[tuple[str, str, str]] = set()
    repeated = [False] * len(words)
    for k, gram in enumerate(zip(words, words[1:], words[2:])):
        if gram in seen:
            repeated[k] = repeated[k + 1] = repeated[k + 2] = True
        else:
            seen.add(gram)
    return sum(repeated) / len(words) if words else 0.0


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone surrogate, which no UTF-8 file can carry."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_messages(messages: Sequence[dict[str, str]], *, min_output_chars: int, max_chars: int,
                   max_repetition: float, n_tokens: Optional[int] = None,
                   max_tokens: Optional[int] = None) -> Optional[tuple[str, str]]:
    """The first reason a cleaned record is unfit, or None.

    Args:
        messages: Cleaned messages.
        min_output_chars: Every assistant turn needs at least this many characters.
        max_chars: Most characters allowed over all turns.
        max_repetition: Most share of a turn's words that may repeat it (:func:`repetition_share`).
        n_tokens: The record's token count, when a tokenizer was given.
        max_tokens: Most tokens allowed (with ``n_tokens``).

    Returns:
        ``(reason, detail)``: reason is one of bad_encoding, empty_field, empty_output, too_long,
        repetitive.
    """
    for n, m in enumerate(messages, 1):
        if has_lone_surrogate(m["content"]):
            return "bad_encoding", (f"turn {n} ({m['role']}) holds a lone surrogate (a broken \\u escape such "
                                    "as \\ud800); fix the text at its source")
    for n, m in enumerate(messages, 1):
        size = len(m["content"])
        if m["role"] == "assistant" and size < min_output_chars:
            return "empty_output", (f"turn {n} (assistant) has {size} characters after cleaning; "
                                    f"data.min_output_chars is {min_output_chars}")
        if m["role"] != "assistant" and size == 0:
            return "empty_field", f"turn {n} ({m['role']}) is empty after cleaning; every turn needs text"
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        return "too_long", f"{total:,} characters over all turns; data.max_chars is {max_chars:,}"
    if max_tokens is not None and n_tokens is not None and n_tokens > max_tokens:
        return "too_long", f"{n_tokens:,} tokens over all turns; the limit (max_tokens) is {max_tokens:,}"
    for n, m in enumerate(messages, 1):
        share = repetition_share(m["content"])
        if share > max_repetition:
            return "repetitive", (f"turn {n} ({m['role']}): {share:.0%} of its words repeat a word 3-gram said "
                                  f"before in it; data.max_repetition is {max_repetition}")
    return None
