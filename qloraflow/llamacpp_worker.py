"""llama.cpp's side of the export stage, run as a script in the environment that has ``llama_cpp``.

The training environment has no llama.cpp build (``make setup-export`` builds one into
``.venv-export``), so ``qloraflow.export`` runs this file there, as the serve stage runs vLLM in its
own environment. It imports nothing from qloraflow: a JSON request in, a JSON answer on stdout::

    .venv-export/bin/python -m qloraflow.llamacpp_worker request.json   # from the checkout

Requests: ``{"op": "quantize", "src": F16_GGUF, "dst": OUT_GGUF, "ftype": "q4_k_m"}`` and
``{"op": "generate", "gguf": PATH, "conversations": [[{"role": ..., "content": ...}, ...], ...],
"max_new_tokens": N, "n_ctx": N}``: greedy answers, each with the prompt as llama.cpp renders it
from the GGUF's own chat template, the token ids and whether generation ended at the stop token.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

# llama.cpp's file types that its quantize tool offers and this stage exports after the converter.
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def quantize(src: str, dst: str, ftype: str, threads: int) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return {"returncode": int(code), "bytes": os.path.getsize(dst) if os.path.exists(dst) else 0}


def generate(gguf: str, conversations: list, max_new_tokens: int, n_ctx: int, threads: int) -> dict:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_batch=min(n_ctx, 512), seed=0,
                          verbose=False)
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    eos, bos = llm.token_eos(), llm.token_bos()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
    out = {"template": template, "eos_id": eos, "bos_id": bos, "eos_token": piece(eos),
           "eog_ids": [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)],
           "answers": []}
    for messages in conversations:
        row = {"rendered": None, "prompt_ids": [], "answer_ids": [], "text": "", "stopped": False}
        if template is None:
            out["answers"].append(row)
            continue
        formatter = Jinja2ChatFormatter(template=template, eos_token=piece(eos), bos_token=piece(bos),
                                        add_generation_prompt=True)
        row["rendered"] = formatter(messages=messages).prompt
        row["prompt_ids"] = llm.tokenize(row["rendered"].encode("utf-8"), add_bos=False, special=True)
        # Greedy (top-1, no penalties): the same decoding as the merged model's reference answers.
        for token in llm.generate(row["prompt_ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            row["answer_ids"].append(int(token))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                row["stopped"] = True
                break
            if len(row["answer_ids"]) >= max_new_tokens:
                break
        ids = row["answer_ids"][:-1] if row["stopped"] else row["answer_ids"]
        row["text"] = llm.detokenize(ids).decode("utf-8", "replace")
        out["answers"].append(row)
    return out


def main(path: str) -> None:
    request = json.loads(open(path).read())
    threads = int(request.get("threads") or os.cpu_count() or 1)
    if request["op"] == "quantize":
        result = quantize(request["src"], request["dst"], request["ftype"], threads)
    elif request["op"] == "generate":
        result = generate(request["gguf"], request["conversations"], int(request["max_new_tokens"]),
                          int(request.get("n_ctx", 512)), threads)
    else:
        raise SystemExit(f"unknown op {request['op']!r}")
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
