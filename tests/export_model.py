"""A small model that answers the demo's task and ends its answers at its stop token, for the export tests.

The export's parity check needs answers that stop: a random base model never emits its eos. A few
hundred steps of full fine-tuning of the demo's tiny Llama on its own text-to-SQL records teaches it
the answers' shape and the ``<|im_end|>`` after them (tens of seconds on 2 cores). Saved like the merge
stage's output (bf16 safetensors, tokenizer with its chat template, generation config).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def conversations(jsonl: Path, n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()[:n]]
    return [[{"role": "user", "content": r["instruction"] + (("\n" + r["input"]) if r["input"] else "")}]
            for r in rows]


SMALL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
"""A narrower Llama than the demo's (about 0.5M parameters instead of 4.2M): the same tokenizer and
architecture for the converter, eight times cheaper to teach to stop."""


def train_stopping_model(demo: Path, out: Path, steps: int = 300, batch: int = 16, seed: int = 0,
                         shape: dict | None = None) -> Path:
    """Full fine-tuning of the demo's base model (or, with ``shape``, a fresh one of that shape and its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qloraflow.tinymodel import build_tiny_llama

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(demo / "base-model")
    model = (build_tiny_llama(tok, seed=seed, dtype="float32", **shape) if shape
             else AutoModelForCausalLM.from_pretrained(demo / "base-model", dtype=torch.float32))
    records = []
    for line in (demo / "data" / "train.jsonl").read_text().splitlines():
        try:  # the demo's train.jsonl carries planted broken lines for the data stage to reject
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("output"), str) and r.get("instruction")]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": r["output"]}], tokenize=False)
             for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        enc = tok(rng.sample(texts, batch), return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys
    import time

    t = time.time()
    train_stopping_model(Path(sys.argv[1]), Path(sys.argv[2]), steps=int(sys.argv[3]) if len(sys.argv) > 3 else 300,
                         shape=SMALL_SHAPE if "--small" in sys.argv else None)
    print(f"trained in {time.time() - t:.1f} s")
