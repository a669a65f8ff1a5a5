"""Export the merged model for local runtimes (GGUF for llama.cpp and Ollama), each checked against it.

Exports are where fine-tuned models break most often downstream: gibberish after conversion, a lost
chat template, a stop token that never fires. So every file written here is run, before the stage
succeeds, by the runtime it is for, on held-out prompts, and compared with the merged model::

    from qloraflow.export import export_gguf
    report = export_gguf("merged_model", "export", ["q8_0", "q4_k_m"], conversations,
                         python=".venv-export/bin/python")

For each GGUF type the stage writes ``model-<type>.gguf`` and an Ollama ``Modelfile-<type>`` beside
it, and checks (any failure raises :class:`ExportError` with every reason):

1. the GGUF carries the merged model's chat template (the same string) and its stop token (the
   GGUF's eos is one of the merged model's eos ids, and llama.cpp treats it as end of generation);
2. llama.cpp renders each held-out conversation from the GGUF's template to the same text as the
   merged tokenizer's ``apply_chat_template``, and tokenizes it to the same ids;
3. every greedy llama.cpp answer ends at the stop token (none runs into ``max_new_tokens``);
4. the share of prompts whose greedy answer equals the merged model's, token for token, is at
   least the type's threshold (:data:`MIN_AGREEMENT`). The report keeps, per prompt, the first
   position where the answers diverge and the two tokens there.

The reference is the merged model in float32 under transformers (greedy, one prompt at a time, no
padding), the same decoding that llama.cpp runs (top-1, no repetition penalty).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from qloraflow.errors import ExportError
from qloraflow.export_gguf import CONVERTER_TYPES, convert, quantize, read_metadata, run_worker

MIN_AGREEMENT: dict[str, float] = {"f32": 0.95, "f16": 0.95, "bf16": 0.95, "q8_0": 0.95, "q6_k": 0.85,
                                   "q5_k_m": 0.75, "q4_k_m": 0.6, "q4_k_s": 0.6, "q4_0": 0.5}
"""Least share of held-out prompts whose greedy answer must equal the merged model's, per GGUF type.

Why these numbers: an answer agrees only if the top-1 token agrees at every one of its positions,
so the threshold follows from how often a type flips the top token. 16-bit and q8_0 (8.5 bits a
weight, round-to-nearest per block of 32) change logits by far less than the gap between the first
and second token at nearly every position: llama.cpp's KL-divergence tables for Llama-class models
give q8_0 "same top token" above 99.5%, so over answers of ~20 tokens at least 95% agree, and a
lower rate means a broken conversion, not rounding. q4_k_m (about 4.9 bits) keeps the top token at
roughly 94-96% of positions on the same tables, which over 20 tokens leaves 30-45% of answers
identical on a random base; a fine-tuned model answers its task with confident tokens, and on the
demo it is measured in the README (a real answer checker, not a token match, would be the next
step). Below 0.6 a q4_k_m export is not the model that was evaluated. The thresholds are per file
type and can be raised or lowered in the config (``export.min_agreement``).
"""


# Ollama's Modelfile TEMPLATE is a Go template, not Jinja: for the chat formats the pipeline knows, the
# Go template below and the function that renders the same text in Python (checked against the merged
# tokenizer's own rendering of the held-out prompts before the Modelfile names it).
OLLAMA_TEMPLATES = {
    "chatml": ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               lambda system, msgs: (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")
               + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
               + "<|im_start|>assistant\n"),
    "llama-3": ("<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
                "{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}"
                "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant"
                "<|end_header_id|>\n\n",
                lambda system, msgs: "<|begin_of_text|>"
                + (f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else "")
                + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                          for m in msgs) + "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def _load_reference(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The merged model's stop tokens: its generation config's eos ids and the tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    return sorted({int(i) for i in ids} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def reference_answers(model: Any, tokenizer: Any, conversations: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy answers of the merged model (float32), one prompt at a time: what each export must reproduce."""
    import torch

    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    rows = []
    for messages in conversations:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad)
        answer = [int(t) for t in out[0, len(ids):]]
        stopped = bool(answer) and answer[-1] in stops
        rows.append({"rendered": rendered, "prompt_ids": ids, "answer_ids": answer, "stopped": stopped,
                     "text": tokenizer.decode(answer[:-1] if stopped else answer, skip_special_tokens=False)})
    return rows


def compare_answers(reference: list[dict], exported: list[dict], tokenizer: Any) -> dict[str, Any]:
    """Agreement rate and, per prompt, the first position where the exported answer diverges."""
    per_prompt = []
    for i, (ref, got) in enumerate(zip(reference, exported)):
        a, b = ref["answer_ids"], got["answer_ids"]
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if at is None and len(a) != len(b):
            at = min(len(a), len(b))
        row: dict[str, Any] = {"prompt": i, "same": at is None, "tokens": len(a)}
        if at is not None:
            tok = lambda ids: tokenizer.decode(ids[at:at + 1], skip_special_tokens=False) if at < len(ids) else "<end>"  # noqa: E731
            row.update(first_divergence=at, merged_token=tok(a), export_token=tok(b),
                       merged_text=ref["text"], export_text=got["text"])
        per_prompt.append(row)
    agree = sum(r["same"] for r in per_prompt) / max(1, len(per_prompt))
    return {"agreement": agree, "per_prompt": per_prompt}


def check_gguf(path: Path, gguf_type: str, reference: list[dict], conversations: list[list[dict]],
               tokenizer: Any, stops: list[int], python: str, max_new_tokens: int,
               min_agreement: Optional[float] = None, n_ctx: int = 512) -> dict[str, Any]:
    """Run one GGUF under llama.cpp on the held-out conversations and check it (see the module docstring).

    Raises:
        ExportError: every failed check, each with its reason and the fix where there is one.
    """
    meta = read_metadata(path)
    started = time.perf_counter()
    got = run_worker(python, {"op": "generate", "gguf": str(path), "conversations": conversations,
                              "max_new_tokens": max_new_tokens, "n_ctx": n_ctx}, timeout_s=1800)
    seconds = time.perf_counter() - started
    problems = []
    template = meta.get("tokenizer.chat_template")
    if template is None:
        problems.append("the GGUF has no tokenizer.chat_template: llama.cpp and Ollama would fall back to a "
                        "guessed format (is chat_template.jinja or tokenizer_config.json's chat_template in the "
                        "merged model folder?)")
    elif template != tokenizer.chat_template:
        problems.append("the GGUF's tokenizer.chat_template differs from the merged tokenizer's")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos not in stops:
        problems.append(f"the GGUF's eos token id is {eos}, not one of the merged model's stop ids {stops}: "
                        "answers would not end where the model ends them")
    elif eos not in got["eog_ids"]:
        problems.append(f"llama.cpp does not treat the GGUF's eos id {eos} as end of generation")
    rendered = [i for i, (r, g) in enumerate(zip(reference, got["answers"]))
                if g["rendered"] is not None and g["rendered"] != r["rendered"]]
    if rendered:
        i = rendered[0]
        problems.append(f"llama.cpp renders {len(rendered)} of {len(reference)} prompts differently from the merged "
                        f"tokenizer's chat template (prompt {i}: {got['answers'][i]['rendered']!r} vs "
                        f"{reference[i]['rendered']!r})")
    tokenized = [i for i, (r, g) in enumerate(zip(reference, got["answers"]))
                 if g["rendered"] == r["rendered"] and g["prompt_ids"] != r["prompt_ids"]]
    if tokenized:
        problems.append(f"llama.cpp tokenizes {len(tokenized)} of {len(reference)} rendered prompts to other ids "
                        f"than the merged tokenizer (prompt {tokenized[0]}): the GGUF's vocabulary or "
                        "pre-tokenizer (tokenizer.ggml.pre) is wrong")
    comparison = compare_answers(reference, got["answers"], tokenizer)
    # A stop is the export's to make where its answer followed the merged model's to the merged model's
    # stop (or the merged model ran on too); an answer that diverged earlier is the agreement's to judge.
    followed = [r["same"] or r["first_divergence"] >= len(ref["answer_ids"])
                for r, ref in zip(comparison["per_prompt"], reference)]
    running = [i for i, g in enumerate(got["answers"]) if g["rendered"] is not None and not g["stopped"]]
    unstopped = [i for i in running if followed[i] or not reference[i]["stopped"]]
    if unstopped:
        ref_too = [i for i in unstopped if not reference[i]["stopped"]]
        problems.append(f"{len(unstopped)} of {len(reference)} llama.cpp answers never reached the stop token within "
                        f"{max_new_tokens} tokens (prompts {unstopped[:8]})"
                        + (f"; the merged model itself runs on at {ref_too[:8]} (raise export.max_new_tokens, or "
                           "the model never learnt to stop)" if ref_too else ""))
    floor = MIN_AGREEMENT.get(gguf_type, 0.95) if min_agreement is None else min_agreement
    if comparison["agreement"] < floor:
        first = next(r for r in comparison["per_prompt"] if not r["same"])
        problems.append(f"greedy agreement {comparison['agreement']:.1%} < {floor:.0%} for {gguf_type} (first "
                        f"divergence: prompt {first['prompt']} at token {first['first_divergence']}, merged "
                        f"{first['merged_token']!r} vs export {first['export_token']!r})")
    report = {"type": gguf_type, "file": path.name, "bytes": path.stat().st_size, "agreement": comparison["agreement"],
              "min_agreement": floor, "stopped": sum(g["stopped"] for g in got["answers"]),
              "ran_on_after_diverging": [i for i in running if i not in unstopped],
              "prompts": len(reference), "eos_id": eos, "eos_token": got["eos_token"],
              "tensor_types": meta["tensor_types"], "llama_cpp_seconds": round(seconds, 2),
              "per_prompt": comparison["per_prompt"], "problems": problems}
    if problems:
        (path.parent / f"check-{gguf_type}.json").write_text(json.dumps(report, indent=1))  # for inspection
        raise ExportError(f"{path}: the {gguf_type} export fails its check against the merged model "
                          f"(details: check-{gguf_type}.json beside it):\n  - " + "\n  - ".join(problems))
    return report


def check_mlx(model_dir: Path, folder: Path, reference: list[dict], conversations: list[list[dict]], python: str,
              max_new_tokens: int, quantize: bool) -> dict[str, Any]:
    """Convert with mlx-lm, load the folder there and answer; fail unless it renders and answers every prompt."""
    from qloraflow.export_mlx import answer_mlx, convert_mlx

    started = time.perf_counter()
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    convert_mlx(model_dir, folder, python, quantize=quantize)
    converted = time.perf_counter() - started
    answers = answer_mlx(folder, conversations, max_new_tokens, python)
    problems = [f"prompt {i}: mlx-lm renders {a['rendered']!r}, the merged tokenizer {r['rendered']!r}"
                for i, (r, a) in enumerate(zip(reference, answers)) if a["rendered"] != r["rendered"]][:3]
    problems += [f"prompt {i}: mlx-lm answered nothing" for i, a in enumerate(answers) if not a["text"].strip()][:3]
    if problems:
        raise ExportError(f"{folder}: the MLX export fails its check:\n  - " + "\n  - ".join(problems))
    same = sum(a["text"].strip() == r["text"].strip() for r, a in zip(reference, answers))
    return {"folder": folder.name, "quantized": quantize, "agreement": same / max(1, len(answers)),
            "answered": len(answers), "convert_seconds": round(converted, 2),
            "answer_seconds": round(time.perf_counter() - started - converted, 2),
            "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())}


def ollama_template(tokenizer: Any, conversations: list[list[dict]]) -> tuple[Optional[str], str]:
    """The Go TEMPLATE and default SYSTEM of an Ollama Modelfile for this tokenizer's chat template.

    A family's template is chosen only when its rendering equals the tokenizer's on every held-out
    conversation (and on the conversation with a system message, from which the default system prompt
    is read); otherwise (None, "") and Ollama keeps the GGUF's own template.
    """
    for name, (go, render) in OLLAMA_TEMPLATES.items():
        plain = [{"role": "user", "content": "Hi"}]
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        system = ""
        head = "<|im_start|>system\n" if name == "chatml" else "<|start_header_id|>system<|end_header_id|>\n\n"
        end = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
        if head in text:  # a template that writes a default system prompt (SmolLM2's)
            system = text.split(head, 1)[1].split(end, 1)[0]
        samples = conversations + [plain]
        ok = all(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 == render(next((m["content"] for m in c if m["role"] == "system"), system),
                           [m for m in c if m["role"] != "system"]) for c in samples)
        if ok:
            return go, system
    return None, ""


def write_modelfile(folder: Path, gguf_name: str, stop_tokens: list[str], template: Optional[str], system: str,
                    generation: dict, n_ctx: int) -> Path:
    """An Ollama ``Modelfile`` beside the GGUF: ``ollama create NAME -f Modelfile`` in that folder."""
    lines = [f"# ollama create <name> -f {('Modelfile-' + gguf_name.split('model-')[-1].removesuffix('.gguf'))}",
             f"FROM ./{gguf_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens]
    # Sampling defaults: the merged model's generation config where it samples, else greedy (as evaluated).
    if generation.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if generation.get(key) is not None:
                lines.append(f"PARAMETER {key} {generation[key]}")
    else:
        lines.append("PARAMETER temperature 0")
    if generation.get("repetition_penalty"):
        lines.append(f"PARAMETER repeat_penalty {generation['repetition_penalty']}")
    lines.append(f"PARAMETER num_ctx {n_ctx}")
    path = folder / f"Modelfile-{gguf_name.split('model-')[-1].removesuffix('.gguf')}"
    path.write_text("\n".join(lines) + "\n")
    return path


def export_gguf(model_dir: str | Path, out_dir: str | Path, types: list[str], conversations: list[list[dict]],
                python: str, max_new_tokens: int = 64, min_agreement: Optional[dict[str, float]] = None,
                mlx_python: Optional[str] = None, mlx_quantize: bool = False) -> dict:
    """Write and check one GGUF (and its Modelfile) per type; return the report (also ``report.json``).

    With ``mlx_python`` (the mlx-lm environment) an MLX folder ``mlx/`` is written too; it must load
    and answer every prompt from the same rendered prompt as the merged model (its greedy agreement,
    in MLX's bf16 arithmetic, is reported, not gated).

    Raises:
        ExportError: a conversion failed, or an export failed its check (every type is checked first; the
            files and ``report.json`` stay for inspection).
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_reference(model_dir)
    stops = stop_ids(model, tokenizer)
    started = time.perf_counter()
    reference = reference_answers(model, tokenizer, conversations, max_new_tokens)
    report: dict[str, Any] = {"prompts": len(conversations), "max_new_tokens": max_new_tokens, "stop_ids": stops,
                              "reference_stopped": sum(r["stopped"] for r in reference),
                              "reference_seconds": round(time.perf_counter() - started, 2), "gguf": {}}
    n_ctx = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 4096)
    template, system = ollama_template(tokenizer, conversations)
    generation = model.generation_config.to_dict()
    del model
    f16: Optional[Path] = None
    failures: list[str] = []
    for gguf_type in types:
        path = out / f"model-{gguf_type}.gguf"
        started = time.perf_counter()
        if gguf_type in CONVERTER_TYPES:
            convert(model_dir, path, gguf_type, python)
        else:  # k-quants start from a 16-bit GGUF (converted once for all of them)
            f16 = f16 or convert(model_dir, out / ".model-f16.gguf", "f16", python)
            quantize(f16, path, gguf_type, python)
        seconds = time.perf_counter() - started
        try:
            check = check_gguf(path, gguf_type, reference, conversations, tokenizer, stops, python, max_new_tokens,
                               (min_agreement or {}).get(gguf_type), n_ctx=n_ctx)
        except ExportError as err:  # check the other types too, then fail with every reason
            failures.append(str(err))
            check = json.loads((out / f"check-{gguf_type}.json").read_text())
        modelfile = write_modelfile(out, path.name, [tokenizer.convert_ids_to_tokens(i) for i in stops], template,
                                    system, generation, n_ctx)
        report["gguf"][gguf_type] = {**check, "convert_seconds": round(seconds, 2), "modelfile": modelfile.name}
    if f16 is not None:
        f16.unlink()
    if mlx_python:
        try:
            report["mlx"] = check_mlx(model_dir, out / "mlx", reference, conversations, mlx_python, max_new_tokens,
                                      mlx_quantize)
        except ExportError as err:
            failures.append(str(err))
    report["ollama_template"] = "from the chat format" if template else "the GGUF's own (no known family matched)"
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if failures:
        raise ExportError("\n".join(failures))
    return report


def _jsonl_conversations(path: Path, n: int) -> list[list[dict]]:
    """The first ``n`` records of an alpaca (instruction/input) or messages JSONL file, as prompt turns."""
    chats = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("messages"):
            chats.append([m for m in row["messages"] if m.get("role") != "assistant"])
        elif isinstance(row, dict) and row.get("instruction"):
            text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            chats.append([{"role": "user", "content": text}])
        if len(chats) == n:
            break
    return chats


def main(argv: Optional[list[str]] = None) -> dict:
    """``python -m qloraflow.export MODEL_DIR OUT --gguf q8_0 q4_k_m --prompts test.jsonl``: export and check."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qloraflow.export", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gguf", nargs="+", default=["q8_0"], help="GGUF types (default q8_0)")
    parser.add_argument("--prompts", type=Path, required=True, help="held-out JSONL (alpaca or messages records)")
    parser.add_argument("-n", type=int, default=16, help="prompts checked (first N)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--python", default=".venv-export/bin/python", help="the export environment's Python")
    args = parser.parse_args(argv)
    try:
        report = export_gguf(args.model_dir, args.out, args.gguf, _jsonl_conversations(args.prompts, args.n),
                             python=args.python, max_new_tokens=args.max_new_tokens)
    except ExportError as err:
        print(f"FAILED: {err}")
        report = json.loads((args.out / "report.json").read_text())
    for t, r in report["gguf"].items():
        print(f"{r['file']:20s} {r['bytes'] / 2**20:8.1f} MiB  agreement {r['agreement']:.1%} (>= "
              f"{r['min_agreement']:.0%})  stopped {r['stopped']}/{r['prompts']}  convert {r['convert_seconds']} s  "
              f"llama.cpp {r['llama_cpp_seconds']} s  {r['modelfile']}")
    return report


if __name__ == "__main__":
    main()
