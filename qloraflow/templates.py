"""Chat templates turn by turn: which text of a rendered conversation is trained, and in which example.

Label masking needs, for every assistant turn, the text the model sees before it (the prompt, ending
with what the template's ``add_generation_prompt`` renders: exactly what a server renders before it
generates) and the text the model is to produce (the answer and the template's end-of-turn marker).
Two ways to cut a conversation, chosen per record:

- **append**: most templates (ChatML, Llama 3.x, Qwen2.5) render a conversation one turn after the
  other: the rendering of the first i turns is a prefix of the rendering of the first i+1. One example
  then holds the whole conversation and each assistant turn is trained in place. A template that
  inserts today's date (Llama 3.2) still appends: every render of one record carries the same date.
- **per_turn**: some templates render earlier turns differently once later turns are added. Qwen3
  drops an assistant turn's ``<think>`` reasoning once a later user turn follows and writes its empty
  ``<think></think>`` block only into the last turn, so one sequence would teach the model its earlier
  answers in a form it never produces. Instead assistant turn k becomes its own example: the
  conversation before it rendered with the generation prompt (the history exactly as the model sees
  it at inference), then turn k's answer, the only trained text.

In both, the trained text of a turn starts where the assistant's own text starts: its reasoning when
the message has some (inline ``<think>...</think>`` or a ``reasoning_content`` field), else its
content. What a template writes before that (Qwen3's empty ``<think>\\n\\n</think>\\n\\n``, the same text
``enable_thinking=False`` puts into the prompt) is context. The trained text ends with the template's
end-of-turn marker (``<|eot_id|>``, ``<|im_end|>``); the whitespace after it is not trained.

A record is refused only where no example can show the model what it will be asked to produce: the
generation prompt is not how the template starts the assistant's turn (DeepSeek-R1's distilled
models prompt with ``<think>\\n</think>`` and render answers without it), or the template does not
render the assistant's text (its content, or the reasoning of the turn being trained).

    from qloraflow.templates import conversation_examples
    examples, method = conversation_examples(tokenizer, template, messages, "data/train.jsonl:53")
"""

from __future__ import annotations

import ast
import base64
from pathlib import Path
from typing import Any, Optional

from qloraflow.errors import TemplateError

REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers aliases these to each other

Example = list[tuple[str, bool]]  # (text, trained) slices of one training example, in order

# Multi-turn probes for the stage report: how the template renders history, before any record is read.
PROBE = [{"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Germany?"},
         {"role": "assistant", "content": "Berlin."}]
VARIANTS = {  # what records may add to the plain probe
    "a system message": [{"role": "system", "content": "You answer in one word."}, *PROBE],
    "<think> reasoning in an assistant turn": [
        PROBE[0], {"role": "assistant", "content": "<think>\nIt is Paris.\n</think>\n\nParis."}, *PROBE[2:]],
}


def render(tokenizer: Any, template: str, messages: list, generation_prompt: bool) -> Any:
    """The conversation rendered as text; a list of conversations gives a list of texts."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


Renderings = tuple[list[str], dict[int, str]]  # one conversation's prefixes: without, and with the generation prompt


def render_turns(tokenizer: Any, template: str, conversations: list[list[dict]]) -> Optional[list[Renderings]]:
    """Every prefix rendering :func:`conversation_examples` reads, for many conversations in two calls.

    Per conversation: ``messages[:i+1]`` rendered for every turn i, and ``messages[:i]`` with the
    generation prompt for every assistant turn i. ``apply_chat_template`` renders a list of
    conversations one by one, exactly as it renders each alone, so this is what one call per prefix
    gives, without that call's fixed cost (the template's variables, the special tokens) paid per prefix.

    Returns:
        ``(fulls, prompts)`` per conversation, or None where a conversation cannot be rendered so
        (an error, or a prompt of no messages, which ``apply_chat_template`` refuses alone but renders
        in a list): :func:`conversation_examples` then renders each record itself, and raises as it does.
    """
    fulls_in, prompts_in = [], []
    try:
        for messages in conversations:
            fulls_in += [messages[: i + 1] for i in range(len(messages))]
            prompts_in += [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not all(prompts_in):
            return None
        fulls = render(tokenizer, template, fulls_in, False) if fulls_in else []
        prompts = render(tokenizer, template, prompts_in, True) if prompts_in else []
    except Exception:  # noqa: BLE001 - the record-by-record path raises it again, naming the record
        return None
    out, f, p = [], 0, 0
    for messages in conversations:
        n = len(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        out.append((fulls[f:f + n], dict(zip(turns, prompts[p:p + len(turns)]))))
        f, p = f + n, p + len(turns)
    return out


def conversation_examples(tokenizer: Any, template: str, messages: list[dict], where: str,
                          train_on: str = "completions", rendered: Optional[Renderings] = None,
                          ) -> tuple[list[Example], str]:
    """Cut one conversation into training examples of ``(text, trained)`` slices.

    Args:
        tokenizer: gives ``apply_chat_template`` (and the bos/eos strings the template reads).
        template: the chat template to render with.
        messages: the record's messages.
        where: the record, for errors (``data/train.jsonl:53``).
        train_on: ``completions`` (assistant turns only) or ``all`` (every slice trained).
        rendered: the conversation's prefixes from :func:`render_turns`; rendered here when None.

    Returns:
        The examples and the method: ``append`` (one example) or ``per_turn`` (one per assistant
        turn); with ``train_on='all'`` a record that does not append is one example of the
        conversation rendered whole (method ``whole``).

    Raises:
        TemplateError: an assistant turn cannot be masked correctly; the message says why and what to do.
    """
    if rendered is None:
        rendered = ([render(tokenizer, template, messages[: i + 1], False) for i in range(len(messages))],
                    {i: render(tokenizer, template, messages[:i], True)
                     for i, m in enumerate(messages) if m["role"] == "assistant"})
    fulls, prompts = rendered
    if _first_rewrite(fulls, prompts) is None:
        example: Example = []
        done = ""
        for i, msg in enumerate(messages):
            if i in prompts:
                example.append((prompts[i][len(done):], False))
                example += answer_slices(prompts[i], fulls[i], msg, where, i)
            else:
                example.append((fulls[i][len(done):], False))
            done = fulls[i]
        if train_on == "all":
            example = [(text, True) for text, _ in example]
        return [[(t, trained) for t, trained in example if t]], "append"
    if train_on == "all":
        return [[(render(tokenizer, template, messages, False), True)]], "whole"
    examples = [[(t, trained) for t, trained in [(prompts[i], False), *answer_slices(prompts[i], fulls[i], m, where, i)]
                 if t] for i, m in enumerate(messages) if i in prompts]
    return examples, "per_turn"


def _first_rewrite(fulls: list[str], prompts: dict[int, str]) -> Optional[tuple[int, str, str]]:
    """The first turn whose rendering does not continue the text before it: ``(turn, before, after)``, or None."""
    done = ""
    for i, full in enumerate(fulls):
        for text in ((prompts[i], full) if i in prompts else (full,)):
            if not text.startswith(done):
                return i, done, text
            done = text
    return None


def answer_slices(prompt: str, full: str, msg: dict, where: str, turn: int) -> Example:
    """The answer of one assistant turn: untrained head, trained text (through the end-of-turn marker), tail.

    Raises:
        TemplateError: the rendering does not start with the generation prompt, or lacks the assistant's text.
    """
    if not full.startswith(prompt):
        at = max(next(k for k, (a, b) in enumerate(zip(prompt, full + "\0")) if a != b) - 30, 0)
        raise TemplateError(
            f"{where}: turn {turn}: the chat template's generation prompt ({prompt[at:at + 60]!r}) is not how it "
            f"renders the start of the assistant's turn ({full[at:at + 60]!r}); a model trained on either "
            "would see another context than a server gives it. Set 'tokenize.chat_template' to a named template, "
            "or fix the tokenizer's template so that add_generation_prompt renders the start of the assistant turn")
    answer = full[len(prompt):]
    start = _answer_start(answer, msg)
    if start is None:
        raise TemplateError(
            f"{where}: turn {turn}: the chat template does not render this assistant message's text "
            f"({_what_is_missing(answer, msg)}), so the tokens to train on cannot be found; fix the record, or "
            "set 'tokenize.chat_template' to a template that renders assistant messages as they are")
    end = len(answer.rstrip())
    return [(answer[:start], False), (answer[start:end], True), (answer[end:], False)]


def _split_reasoning(msg: dict) -> tuple[str, str]:
    """``(reasoning, final answer)`` of an assistant message; reasoning is '' when it has none."""
    content = msg.get("content") or ""
    field = next((msg[k] for k in REASONING_FIELDS if msg.get(k)), None)
    if field is not None:
        return field, content
    if REASONING_CLOSE in content:
        head, _, final = content.partition(REASONING_CLOSE)
        return head.split(REASONING_OPEN)[-1], final
    return "", content


def _answer_start(answer: str, msg: dict) -> Optional[int]:
    """Where the assistant's own text starts in its rendered answer, or None if it is not all there."""
    content = msg.get("content") or ""
    reasoning, final = _split_reasoning(msg)
    if not reasoning.strip():
        for text in (content, content.strip()):
            if text and (start := answer.find(text)) >= 0:
                return start
        return None
    at = answer.find(reasoning.strip())
    if at < 0 or answer.find(final.strip(), at + len(reasoning.strip())) < 0:
        return None
    opening = answer.rfind(REASONING_OPEN, 0, at)
    return opening if opening >= 0 else at


def _what_is_missing(answer: str, msg: dict) -> str:
    reasoning, final = _split_reasoning(msg)
    if reasoning.strip() and reasoning.strip() not in answer:
        return f"its reasoning {reasoning.strip()[:40]!r} is dropped from the turn being trained"
    return f"{final.strip()[:40]!r} is not in the rendered turn {answer[:80]!r}"


def describe_masking(tokenizer: Any, template: str, source: str = "the chat template") -> dict[str, Any]:
    """How records will be cut, from multi-turn probe conversations: for the stage report.

    Args:
        tokenizer, template: as for :func:`conversation_examples`.
        source: names the template in errors (``the chat template of models/base``).

    Returns:
        ``{"method", "why"}`` of a plain two-turn conversation, and ``"notes"`` on records with a system
        message or reasoning that are cut otherwise or refused, and on a template that inserts the date.

    Raises:
        TemplateError: the template cannot be trained on at all (a plain probe turn cannot be masked).
    """
    from jinja2.exceptions import TemplateError as RenderError  # the template's own raise_exception

    try:
        method = conversation_examples(tokenizer, template, PROBE, "probe")[1]
    except TemplateError as e:
        raise TemplateError(f"{source} cannot be trained on: in a plain two-turn probe conversation, "
                            f"{str(e).removeprefix('probe: ')}") from None
    except RenderError as e:
        return {"method": "per record", "why": f"the template does not render a plain two-turn probe conversation "
                f"({e}); each record is cut as its own rendering allows"}
    if method == "append":
        why = ("the template renders each turn as a continuation of the turns before it: each record is one example "
               "and every assistant turn in it is trained in place (a record that does not append is cut into one "
               "example per assistant turn: per_turn_records in each split)")
    else:
        why = (f"the template renders earlier turns differently once later turns are added "
               f"({_rewrite(tokenizer, template, PROBE)}): each assistant turn of a multi-turn record is its own "
               "example, the conversation before it rendered with the generation prompt as at inference, and only "
               "that turn is trained")
    notes = []
    for what, messages in VARIANTS.items():
        try:
            variant = conversation_examples(tokenizer, template, messages, "probe")[1]
        except (TemplateError, RenderError) as e:
            notes.append(f"records with {what} will be refused: {str(e).removeprefix('probe: ')}")
            continue
        if variant != method:
            notes.append(f"records with {what} are cut into one example per assistant turn: the template renders "
                         f"them differently once later turns are added ({_rewrite(tokenizer, template, messages)})")
    if "strftime_now" in template:
        notes.append("the template inserts the current date (strftime_now): training renders the date of this run, "
                     "a server the date it serves on")
    out = {"method": method, "why": why}
    return {**out, "notes": notes} if notes else out


def _rewrite(tokenizer: Any, template: str, messages: list[dict]) -> str:
    """Where a conversation's rendering first stops continuing the text before it, in words."""
    turn, before, after = _first_rewrite(
        [render(tokenizer, template, messages[: i + 1], False) for i in range(len(messages))],
        {i: render(tokenizer, template, messages[:i], True)
         for i, m in enumerate(messages) if m["role"] == "assistant"})
    at = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return f"at turn {turn}, {before[max(at - 30, 0):at + 30]!r} became {after[max(at - 30, 0):at + 30]!r}"


def build_llama3_tokenizer(folder: str | Path, instruct: bool = True) -> Any:
    """The Llama 3 tokenizer (128,256 tokens) from Meta's reference files, as a transformers fast tokenizer.

    The split pattern and the special tokens (``<|begin_of_text|>`` = 128000 ... ``<|eot_id|>`` = 128009,
    256 in all) are read from the folder's ``tokenizer.py``, the BPE ranks from its ``tokenizer.model``.

    Args:
        folder: holds ``tokenizer.model`` and ``tokenizer.py`` (``qloraflow.assets.fetch("llama3-tokenizer")``).
        instruct: eos ``<|eot_id|>``, the end of every chat turn (the Instruct models'); else
            ``<|end_of_text|>`` (the base models').

    Returns:
        A ``PreTrainedTokenizerFast`` with bos ``<|begin_of_text|>`` and no chat template.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = Path(folder)
    pattern, names, reserved = _llama3_reference(folder / "tokenizer.py")
    specials = names + [f"<|reserved_special_token_{2 + i}|>" for i in range(reserved - len(names))]

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # tiktoken's format, read without tiktoken
            ranks = {}
            for line in Path(path).read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = Converter(str(folder / "tokenizer.model"), pattern=pattern, extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>" if instruct else "<|end_of_text|>",
                                   clean_up_tokenization_spaces=False, model_max_length=131072)


def _llama3_reference(path: Path) -> tuple[str, list[str], int]:
    """``pat_str``, the named special tokens and ``num_reserved_special_tokens`` of Meta's ``Tokenizer``."""
    pattern, names, reserved = None, None, None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name == "pat_str":
                pattern = ast.literal_eval(node.value)
            elif name == "num_reserved_special_tokens":
                reserved = ast.literal_eval(node.value)
            elif name == "special_tokens" and isinstance(node.value, ast.List):
                names = ast.literal_eval(node.value)
    if pattern is None or names is None or reserved is None:
        raise TemplateError(f"{path} is not Meta's Llama 3 tokenizer.py (no pat_str, special_tokens or "
                            "num_reserved_special_tokens); fetch it with qloraflow.assets.fetch('llama3-tokenizer')")
    return pattern, names, reserved
