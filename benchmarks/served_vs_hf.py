"""Served (vLLM) against HF greedy answers on the Spider test prompts, token by token.

    python benchmarks/served_vs_hf.py --model build/smollm2 --n 32 --hf-dtype bfloat16 --serve-dtype auto

Prepares the data and tokenize stages of ``configs/smollm2-spider.yaml`` under ``--work`` (once), renders
the first ``--n`` test prompts with the saved chat template as the evaluate stage does, generates them
greedily with HF ``generate`` (``qloraflow.evaluate.generate_greedy``'s batching and stops) and with vLLM's
OpenAI chat endpoint (the server started as the deploy stage starts it), then for every answer that differs
prints the first diverging token, both tokens, and the HF logit margin between them teacher-forced on the
common prefix (in the HF dtype and in float32). Writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qloraflow.config import load_config  # noqa: E402
from qloraflow.data import prepare_dataset  # noqa: E402
from qloraflow.evaluate import _eos_ids, generation_batches, prompt_messages  # noqa: E402
from qloraflow.precision import DTYPES  # noqa: E402
from qloraflow.serve import VllmServer, compare_with_hf  # noqa: E402
from qloraflow.tokenize import tokenize_dataset  # noqa: E402


def prepare(cfg, work: Path, model: str) -> tuple[Path, Path]:
    data, tok = work / "data", work / "tok"
    if not (data / "test.parquet").is_file():
        prepare_dataset(cfg.data, data, seed=cfg.seed)
    if not (tok / "tokenizer").is_dir():
        tokenize_dataset(cfg.tokenize, data, model, tok)
    return data, tok


@torch.no_grad()
def hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
    """generate_greedy's batching, returning the token ids (EOS cut) as well as the text."""
    eos = _eos_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [None] * len(prompts)
    for batch in generation_batches([len(e) for e in encoded], max_new_tokens, batch_size, None):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(batch, out[:, enc["input_ids"].shape[1]:].tolist()):
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            ids[i] = row[: stop + 1] if stop is not None else row
    texts = [tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True) for r in ids]
    return ids, texts, encoded


def vllm_generate(model_dir, cfg, log, chats, max_tokens, dtype):
    from openai import OpenAI

    serve = cfg.serve
    serve.dtype = dtype
    out = []
    with VllmServer(model_dir, serve, log) as srv:
        client = OpenAI(base_url=srv.base_url, api_key=srv.api_key, timeout=120, max_retries=0)
        for messages in chats:
            r = client.chat.completions.create(
                model=srv.model_name, messages=messages, temperature=0.0, max_tokens=max_tokens, logprobs=True,
                top_logprobs=3, extra_body={"return_tokens_as_token_ids": True})
            c = r.choices[0]
            toks = [int(t.token.split(":")[1]) for t in c.logprobs.content]
            tops = [{int(a.token.split(":")[1]): a.logprob for a in t.top_logprobs} for t in c.logprobs.content]
            out.append({"text": c.message.content or "", "ids": toks, "top": tops, "finish": c.finish_reason})
    return out


@torch.no_grad()
def margins(model, prompt_ids, prefix, a, b):
    """Logit(a) - logit(b) at the position after prompt + prefix, teacher-forced."""
    x = torch.tensor([prompt_ids + prefix])
    logits = model(input_ids=x).logits[0, -1].float()
    top2 = torch.topk(logits, 2)
    return float(logits[a] - logits[b]), int(top2.indices[0]), float(top2.values[0] - top2.values[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-spider.yaml")
    ap.add_argument("--model", default="build/smollm2")
    ap.add_argument("--work", default=".cache/served_vs_hf")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--serve-dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import datasets

    cfg = load_config(args.config)
    work = Path(args.work)
    data, tok = prepare(cfg, work, args.model)
    served = work / "served"  # the model folder as merge writes it: weights + the tokenize stage's tokenizer
    if not served.is_dir():
        shutil.copytree(args.model, served)
        for f in (tok / "tokenizer").iterdir():
            shutil.copy(f, served / f.name)
    tokenizer = AutoTokenizer.from_pretrained(str(tok / "tokenizer"))
    records = datasets.Dataset.from_parquet(str(data / "test.parquet")).to_list()[: args.n]
    chats, _ = prompt_messages(records)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    e = cfg.eval
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(served), dtype=DTYPES[args.hf_dtype]).eval()
    hf_ids, hf_text, enc = hf_generate(model, tokenizer, prompts, e.max_new_tokens, e.batch_size)
    print(f"HF {args.hf_dtype}: {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    vl = vllm_generate(str(served), cfg, work / f"vllm-{args.serve_dtype}.log", chats, e.max_new_tokens,
                       args.serve_dtype)
    print(f"vLLM {args.serve_dtype}: {time.time() - t0:.0f} s", flush=True)
    ids = [str(r["id"]) for r in records]
    agreement = compare_with_hf({i: v["text"] for i, v in zip(ids, vl)}, dict(zip(ids, hf_text)))
    fp32 = AutoModelForCausalLM.from_pretrained(str(served), dtype=torch.float32).eval()
    rows = []
    for k, rid in enumerate(ids):
        h, v = hf_ids[k], vl[k]["ids"]
        pos = next((j for j in range(min(len(h), len(v))) if h[j] != v[j]), None)
        if pos is None and len(h) == len(v):
            continue
        row = {"id": rid, "text_equal": hf_text[k].strip() == vl[k]["text"].strip(), "hf_len": len(h),
               "vllm_len": len(v), "vllm_finish": vl[k]["finish"]}
        if pos is not None:
            a, b = h[pos], v[pos]
            m, top, gap = margins(model, enc[k], h[:pos], a, b)
            m32, top32, gap32 = margins(fp32, enc[k], h[:pos], a, b)
            vtop = vl[k]["top"][pos]
            row.update(pos=pos, hf_token=tokenizer.decode([a]), vllm_token=tokenizer.decode([b]),
                       hf_margin=m, hf_margin_fp32=m32, fp32_argmax_is_hf=top32 == a, fp32_argmax_is_vllm=top32 == b,
                       vllm_logprob_gap=(vtop.get(b, float("nan")) - vtop.get(a, float("nan"))))
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The deploy stage's check (qloraflow.agreement): every served token against the float32 argmax.
    from qloraflow.agreement import check_served_tokens, served_dtype
    dt = served_dtype(args.serve_dtype, json.loads((served / "config.json").read_text()))
    by_id = dict(zip(ids, prompts))
    check_vllm = check_served_tokens(fp32, tokenizer, by_id, {i: v["ids"] for i, v in zip(ids, vl)}, dt)
    check_hf = check_served_tokens(fp32, tokenizer, by_id, dict(zip(ids, hf_ids)), args.hf_dtype)
    for name, c in (("vllm", check_vllm), ("hf", check_hf)):
        firsts = [a["first_divergence"]["margin_ulps"] for a in c["answers"].values() if a["first_divergence"]]
        print(json.dumps({"check": name, **{k: c[k] for k in ("passed", "served_dtype", "n", "answers_all_argmax",
                                                            "tokens", "argmax_tokens", "worst_margin",
                                                            "worst_margin_ulps", "failed")},
                          "first_divergence_ulps": sorted(round(f, 2) for f in firsts)}), flush=True)
    summary = {"hf_dtype": args.hf_dtype, "serve_dtype": args.serve_dtype, "n": agreement["n"],
               "identical_text": agreement["identical"], "share": agreement["share"],
               "token_mismatches": len(rows)}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "mismatches": rows,
                                              "hf": hf_text, "vllm": [v["text"] for v in vl],
                                              "check_vllm": check_vllm, "check_hf": check_hf, "ids": ids, "hf_ids": hf_ids, "vllm_ids": [v["ids"] for v in vl]}, indent=1))


if __name__ == "__main__":
    main()
