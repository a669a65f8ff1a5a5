"""Offline assets for the CPU demo: a shop database, a text-to-SQL dataset and a tiny base model.

Everything is generated from a seed, with no download: a SQLite database, alpaca-style train and
test JSONL files of templated questions over it (train.jsonl carries planted problems for the data
stage to find), and a 4-layer Llama with random weights plus a byte-level BPE tokenizer trained on
the generated text (both built by ``qloraflow.tinymodel``). Two runs with the same seed write
byte-identical files. ``MANIFEST.json`` is written last; a folder whose manifest matches the request
is reused as it is::

    python -m qloraflow.demo --out build/demo --seed 0

Layout under ``--out``: ``data/{shop.sqlite,schema.sql,train.jsonl,test.jsonl}``, ``base-model/``
(``from_pretrained``-ready, bfloat16) and ``MANIFEST.json`` (seed, counts, planted problems, sha256
of every file).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

from qloraflow import tinymodel
from qloraflow.files import sha256_file, write_atomic
from qloraflow.tinymodel import (BOS, DEFAULT_VOCAB_SIZE, IM_END, PAD, TINY_LLAMA_SHAPE, build_tiny_llama,
                                 build_tokenizer)

PROMPT_PREFIX = "Write an SQLite query: "

SCHEMA_SQL = """\
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    city TEXT NOT NULL,
    age INTEGER NOT NULL
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price REAL NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    order_date TEXT NOT NULL
);
"""
# Every first name, last name, adjective and noun is used once, so any two customers (products)
# differ in both words of their name: value-only variants of a question stay far from Jaccard 0.8.
FIRST_NAMES = """Ana Ben Carla David Elena Felix Grace Hugo Ines Jonas Karin Luca Maya Nils Olga Pablo Rosa Sven
    Tara Victor Alice Bruno Chloe Diego Emma Frank Greta Henry Ida Jack Kim Leo Mia Noah Oscar Paula Quinn Rita
    Sam Tom Uma Vera Walter Xenia Yusuf Zoe Anton Bianca Carl Dora Emil Flora Gustav Hanna Igor Julia Kurt Lena
    Marco Nina""".split()
LAST_NAMES = """Silva Meyer Rossi Novak Dubois Larsen Costa Weber Moreau Berg Romano Kowalski Jensen Fischer
    Garcia Lopez Martin Bernard Schmidt Wagner Becker Hoffmann Ricci Conti Ferrari Santos Pereira Almeida Nielsen
    Hansen Olsen Johansson Lindberg Svensson Horvat Kovacs Nagy Dvorak Svoboda Murphy Kelly Walsh Byrne Ryan
    Brennan Fontaine Girard Lambert Mercier Blanc Vogel Keller Zimmer Krause Marino Greco Moretti Barbieri
    Navarro Ortega""".split()
CITIES = "Paris Lyon Berlin Munich Madrid Rome Milan Lisbon Vienna Prague Dublin Oslo".split()
PRODUCT_NOUNS = {
    "kitchen": "Kettle Toaster Blender Skillet Teapot Whisk Ladle".split(),
    "garden": "Shovel Hose Rake Planter Lantern Trowel Sprinkler".split(),
    "books": "Novel Atlas Cookbook Journal Dictionary Almanac Anthology".split(),
    "toys": "Puzzle Kite Robot Yoyo Teddy Marbles Scooter".split(),
    "sports": "Racket Football Helmet Skates Dumbbell Kayak Frisbee".split(),
    "music": "Guitar Ukulele Drum Keyboard Harmonica Violin Flute".split(),
    "office": "Stapler Binder Calculator Marker Organizer Printer Folder".split(),
    "beauty": "Shampoo Perfume Lipstick Lotion Brush Mirror Comb".split(),
}
ADJECTIVES = """Classic Compact Deluxe Mini Smart Eco Royal Swift Bright Nordic Urban Rustic Modern Vintage Golden
    Silver Quiet Rapid Sunny Cosy Bold Pure Prime Solid Happy Lucky Magic Noble Polar Retro Simple Sturdy Tiny
    Grand Fresh Crisp Velvet Amber Coral Ivory Jade Ruby Onyx Misty Alpine Coastal Cosmic Stellar Breezy Dapper
    Elegant Frosty Gentle Hearty Jolly Lively""".split()
N_CUSTOMERS, N_PRODUCTS, N_ORDERS = len(FIRST_NAMES), sum(map(len, PRODUCT_NOUNS.values())), 200

# (name, question, answer). Values sit mid-sentence where the phrasing allows, so questions that
# differ only in a value share few word 3-shingles (Jaccard well under 0.8: not near duplicates).
# Customer and product names each get two templates: copying a name from the question into the
# query is the skill a tiny model learns last.
TEMPLATES = [
    ("count_city", "how many customers from {city} are there?",
     "SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
    ("names_city", "list the names of all {city} customers.",
     "SELECT name FROM customers WHERE city = '{city}';"),
    ("avg_age_city", "what is the average age of the {city} customers?",
     "SELECT AVG(age) FROM customers WHERE city = '{city}';"),
    ("city_older_than", "how many customers from {city} are older than {age} years?",
     "SELECT COUNT(*) FROM customers WHERE city = '{city}' AND age > {age};"),
    ("youngest_city", "list the {k} youngest {city} customers.",
     "SELECT name FROM customers WHERE city = '{city}' ORDER BY age LIMIT {k};"),
    ("products_category", "list the products in the {category} category.",
     "SELECT name FROM products WHERE category = '{category}';"),
    ("max_price_category", "what is the highest price in the {category} category?",
     "SELECT MAX(price) FROM products WHERE category = '{category}';"),
    ("min_price_category", "what is the lowest price in the {category} category?",
     "SELECT MIN(price) FROM products WHERE category = '{category}';"),
    ("cheaper_than", "which products cost less than {price} dollars?",
     "SELECT name FROM products WHERE price < {price};"),
    ("category_cheaper_than", "which {category} products cost less than {price} dollars?",
     "SELECT name FROM products WHERE category = '{category}' AND price < {price};"),
    ("count_per_category", "how many products in each category cost more than {price} dollars?",
     "SELECT category, COUNT(*) FROM products WHERE price > {price} GROUP BY category;"),
    ("most_expensive", "list the {k} most expensive products.",
     "SELECT name FROM products ORDER BY price DESC LIMIT {k};"),
    ("city_of_customer", "which city does {name} live in?",
     "SELECT city FROM customers WHERE name = '{name}';"),
    ("price_of_product", "what does the {product} cost?",
     "SELECT price FROM products WHERE name = '{product}';"),
    ("orders_of_customer", "how many orders did {name} place?",
     "SELECT COUNT(*) FROM orders JOIN customers c ON c.id = customer_id WHERE c.name = '{name}';"),
    ("quantity_of_product", "what total quantity of {product} was ordered?",
     "SELECT SUM(quantity) FROM orders JOIN products p ON p.id = product_id WHERE p.name = '{product}';"),
]
# Planted problems in train.jsonl (the data stage must find exactly these).
N_EXACT_DUPLICATES, N_NEAR_DUPLICATES, N_INVALID_JSON = 5, 4, 2
# A near copy swaps the instruction's first word: one shingle of the text changes, so a long-ish
# instruction stays above Jaccard 0.8 even on its own, without the (identical) output.
NEAR_DUP_WORDS = ["Give", "Compose", "Produce", "Draft"]
MIN_NEAR_DUP_JACCARD = 0.84
# Filler for the tokenizer corpus: common words plus made-up English-sounding ones, so the merges
# also cover ordinary text and not only template fragments.
FILLER_WORDS = (
    "the a an of to in on for with from by at and or but not is are was were be has have had do this that "
    "it they we you people time year day week month shop store order customer product price city age name "
    "list count total number average highest lowest most least each every all some many few more less than "
    "table query data row column value result report buy sell sold pay paid cheap new old young small large "
    "good best first last next other find show tell ask answer question write read make use want need know "
    "system user assistant model language please thank today north south east west river garden kitchen"
).split()
SYLLABLES = ([o + v for o in ("b br c ch d f fl g gr h j k l m n p pl r s sh st t th tr v w").split()
              for v in ("a e i o u ai ea ee oo ou").split()], ("", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck"))


def generate_demo_assets(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_test: int = 100) -> dict:
    """Write the demo's database, dataset and base model under ``out_dir`` (or reuse them).

    Args:
        out_dir: Output folder; only ``data/``, ``base-model/`` and ``MANIFEST.json`` in it are touched.
        seed: Seed of every random choice (data, tokenizer corpus, model weights).
        n_train: Clean records in train.jsonl (the planted problem lines come on top).
        n_test: Records in test.jsonl; none of their (instruction, output) pairs is in train.

    Returns:
        The manifest: ``seed``, ``n_train``, ``n_test``, ``generator`` (sha256 of the generator's code),
        ``counts``, ``templates`` (train records per template), ``planted`` (1-based train.jsonl lines
        of each planted problem, with ``duplicate_of`` lines for duplicates), ``tokenizer``, ``model``
        and ``files`` (relative path -> sha256); plus ``reused`` and ``out_dir``.

    Raises:
        ValueError: n_train + n_test exceeds the distinct questions the templates can make.
        FileExistsError: ``data/`` or ``base-model/`` holds a file this module does not write
            (it would be deleted on regeneration, so nothing is touched).
    """
    out = Path(out_dir)
    request = {"seed": seed, "n_train": n_train, "n_test": n_test, "generator": _generator_hash()}
    manifest = _valid_manifest(out, request)
    if manifest is not None:
        return {**manifest, "reused": True, "out_dir": str(out)}

    # Incomplete or stale: the manifest goes first, so a run killed below never looks complete.
    _clear_old_assets(out)
    (out / "data").mkdir(parents=True)
    rng = random.Random(seed)

    db_path = out / "data" / "shop.sqlite"
    (out / "data" / "schema.sql").write_text(SCHEMA_SQL)
    rows = write_shop_db(db_path, rng)
    pool = _question_pool(db_path, rng, need=n_train + n_test + N_INVALID_JSON + 2)
    test, train, spare = pool[:n_test], pool[n_test:n_test + n_train], pool[n_test + n_train:]
    lines, planted = _plant_problems(train, spare, rng)
    _write_lines(out / "data" / "train.jsonl", lines)
    _write_lines(out / "data" / "test.jsonl", [_record_line(r) for r in test])

    tokenizer = build_tokenizer(_tokenizer_corpus(train + test, rng), DEFAULT_VOCAB_SIZE)
    model = build_tiny_llama(tokenizer, seed)
    tokenizer.save_pretrained(out / "base-model")
    model.save_pretrained(out / "base-model", safe_serialization=True)
    lengths = [len(tokenizer(r["instruction"] + r["output"], add_special_tokens=False)["input_ids"])
               for r in train + test]

    manifest = {
        **request,
        "counts": {**rows, "train_records": len(train), "train_lines": len(lines), "test_records": len(test),
                   "planted": sum(len(v) for v in planted.values())},
        "templates": {name: sum(r["template"] == name for r in train) for name, _, _ in TEMPLATES},
        "planted": planted,
        "tokenizer": {"vocab": len(tokenizer), "bos": BOS, "eos": IM_END, "pad": PAD,
                      "max_record_tokens": max(lengths)},
        "model": {"params": sum(p.numel() for p in model.parameters()), "dtype": "bfloat16",
                  "vocab_size": model.config.vocab_size, **TINY_LLAMA_SHAPE},
        "files": _file_hashes(out),
    }
    write_atomic(out / "MANIFEST.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {**manifest, "reused": False, "out_dir": str(out)}


# ----------------------------------------------------------------------------- database


def write_shop_db(path: Path, rng: random.Random) -> dict[str, int]:
    """Create the shop database (schema + rows drawn from ``rng``); return the row counts."""
    names = [f"{f} {l}" for f, l in zip(rng.sample(FIRST_NAMES, N_CUSTOMERS), rng.sample(LAST_NAMES, N_CUSTOMERS))]
    customers = [(i + 1, n, rng.choice(CITIES), rng.randint(18, 80)) for i, n in enumerate(names)]
    goods = [(c, noun) for c in sorted(PRODUCT_NOUNS) for noun in PRODUCT_NOUNS[c]]
    products = [(i + 1, f"{adjective} {noun}", category, rng.randint(300, 40000) / 100)
                for i, ((category, noun), adjective) in enumerate(zip(rng.sample(goods, N_PRODUCTS),
                                                                      rng.sample(ADJECTIVES, N_PRODUCTS)))]
    start = datetime.date(2024, 1, 1)
    orders = [(i + 1, rng.randint(1, N_CUSTOMERS), rng.randint(1, N_PRODUCTS), rng.randint(1, 5),
               (start + datetime.timedelta(days=rng.randrange(366))).isoformat()) for i in range(N_ORDERS)]
    con = sqlite3.connect(path)
    try:
        con.executescript(SCHEMA_SQL)
        con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", customers)
        con.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
        con.commit()
    finally:
        con.close()
    return {"customers": len(customers), "products": len(products), "orders": len(orders)}


# ----------------------------------------------------------------------------- questions


def _question_pool(db_path: Path, rng: random.Random, need: int) -> list[dict]:
    """``need`` distinct questions, spread evenly over the templates, in random order.

    Only fills whose query returns an informative result are used (rows, no NULL, not a bare 0,
    all ``k`` rows for LIMIT k): an empty answer would let a wrong query score on execution.
    """
    con = sqlite3.connect(db_path)
    try:
        domains = {
            "city": CITIES,
            "category": sorted(PRODUCT_NOUNS),
            "name": [r[0] for r in con.execute("SELECT name FROM customers ORDER BY id")],
            "product": [r[0] for r in con.execute("SELECT name FROM products ORDER BY id")],
            "age": list(range(20, 76)),
            "price": list(range(5, 401)),
        }
        per_template = []
        for name, question, answer in TEMPLATES:
            slots = sorted(set(re.findall(r"\{(\w+)\}", question)))
            ks = range(2, 6) if name == "youngest_city" else range(2, 11)
            candidates = []
            for values in itertools.product(*(ks if s == "k" else domains[s] for s in slots)):
                fill = dict(zip(slots, values))
                sql = answer.format(**fill)
                result = con.execute(sql).fetchall()
                if (not result or result == [(0,)] or any(v is None for row in result for v in row)
                        or ("k" in fill and len(result) != fill["k"])):
                    continue
                candidates.append({"template": name, "instruction": PROMPT_PREFIX + question.format(**fill),
                                   "output": sql})
            rng.shuffle(candidates)
            per_template.append(candidates)
    finally:
        con.close()
    total = sum(len(c) for c in per_template)
    if need > total:
        raise ValueError(f"n_train + n_test + {need - total} planted records need {need} distinct questions; "
                         f"the templates make {total} over this database: lower n_train or n_test")
    pool: list[dict] = []
    for round_ in itertools.count():  # round robin, so small templates are used up, not skipped
        for candidates in per_template:
            if round_ < len(candidates) and len(pool) < need:
                pool.append(candidates[round_])
        if len(pool) == need:
            break
    rng.shuffle(pool)
    return pool


def _record_line(rec: dict) -> str:
    return json.dumps({"instruction": rec["instruction"], "input": "", "output": rec["output"]}, ensure_ascii=False)


def word_shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    """Lowercased word k-shingles, words split as ``minhash.shingle_hashes`` splits them."""
    words = re.findall(r"[a-z0-9_\u0080-\U0010ffff]+", text.lower())
    if len(words) < k:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: str, b: str, k: int = 3) -> float:
    """Exact Jaccard similarity of two texts' word k-shingle sets."""
    sa, sb = word_shingles(a, k), word_shingles(b, k)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _plant_problems(train: list[dict], spare: list[dict], rng: random.Random) -> tuple[list[str], dict]:
    """train.jsonl lines: the clean records with planted problems inserted at random places.

    Copies always come after their original, so "keep the first" keeps the original.
    """
    entries: list[dict] = [{"line_text": _record_line(r), "rec": r} for r in train]
    # Near copies come from instructions long enough to stay above the threshold on their own.
    long_enough = [e for e in entries
                   if jaccard(e["rec"]["instruction"], _near_copy(e["rec"]["instruction"], "Give"))
                   >= MIN_NEAR_DUP_JACCARD]
    near_src = rng.sample(long_enough, N_NEAR_DUPLICATES)
    exact_src = rng.sample([e for e in entries if all(e is not n for n in near_src)], N_EXACT_DUPLICATES)

    def insert_after(entry: Optional[dict], new: dict) -> None:
        lo = 0 if entry is None else next(i for i, e in enumerate(entries) if e is entry) + 1
        entries.insert(rng.randint(lo, len(entries)), new)

    for src in exact_src:
        insert_after(src, {"kind": "exact_duplicates", "line_text": src["line_text"], "of": src})
    for src, word in zip(near_src, NEAR_DUP_WORDS):
        rec = src["rec"]
        text = _near_copy(rec["instruction"], word)
        insert_after(src, {"kind": "near_duplicates", "of": src,
                           "line_text": _record_line({**rec, "instruction": text}),
                           "jaccard_instruction": round(jaccard(rec["instruction"], text), 4),
                           "jaccard_record": round(jaccard(rec["instruction"] + "\n" + rec["output"],
                                                           text + "\n" + rec["output"]), 4)})
    bad = [_record_line(r) for r in spare[:N_INVALID_JSON]]
    insert_after(None, {"kind": "invalid_json", "line_text": bad[0][: len(bad[0]) * 2 // 3]})  # cut short
    insert_after(None, {"kind": "invalid_json", "line_text": bad[1].replace('"', "'")})  # Python-style quotes
    insert_after(None, {"kind": "missing_output", "line_text": json.dumps(
        {"instruction": spare[N_INVALID_JSON]["instruction"], "input": ""})})
    insert_after(None, {"kind": "non_string_output", "line_text": json.dumps(
        {"instruction": spare[N_INVALID_JSON + 1]["instruction"], "input": "", "output": 3})})
    insert_after(None, {"kind": "empty_lines", "line_text": ""})

    for number, e in enumerate(entries, start=1):
        e["line"] = number
    planted: dict[str, list] = {k: [] for k in ("exact_duplicates", "near_duplicates", "invalid_json",
                                                "missing_output", "non_string_output", "empty_lines")}
    for e in (e for e in entries if "kind" in e):
        planted[e["kind"]].append(e["line"] if "of" not in e else {
            "line": e["line"], "duplicate_of": e["of"]["line"],
            **{k: e[k] for k in ("jaccard_instruction", "jaccard_record") if k in e}})
    return [e["line_text"] for e in entries], planted


def _near_copy(instruction: str, word: str) -> str:
    return word + instruction[instruction.index(" "):]


# ----------------------------------------------------------------------------- tokenizer and model


def _tokenizer_corpus(records: list[dict], rng: random.Random) -> list[str]:
    """Dataset text, the schema, and English-like filler so merges are not all template fragments."""
    corpus = [f"{r['instruction']}\n{r['output']}" for r in records] + SCHEMA_SQL.splitlines()
    made_up = ["".join(rng.choice(SYLLABLES[0]) for _ in range(rng.randint(1, 3))) + rng.choice(SYLLABLES[1])
               for _ in range(1500)]
    lexicon = FILLER_WORDS + made_up
    for _ in range(4000):
        words = [rng.choice(lexicon) for _ in range(rng.randint(5, 14))]
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return corpus


# ----------------------------------------------------------------------------- files and manifest


# What this module writes: a folder holding anything else is not deleted on regeneration.
OWN_FILES = {"data": {"shop.sqlite", "shop.sqlite-journal", "schema.sql", "train.jsonl", "test.jsonl"},
             "base-model": {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}}


def _clear_old_assets(out: Path) -> None:
    for sub, names in OWN_FILES.items():
        foreign = [p for p in (out / sub).rglob("*") if p.name not in names]
        if foreign:
            raise FileExistsError(f"{foreign[0]}: not a demo asset, and {out / sub} would be deleted to regenerate "
                                  f"the demo assets; move it away or pass another --out folder")
    (out / "MANIFEST.json").unlink(missing_ok=True)
    for sub in OWN_FILES:
        shutil.rmtree(out / sub, ignore_errors=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _file_hashes(out: Path) -> dict[str, str]:
    files = sorted(p for sub in OWN_FILES for p in (out / sub).rglob("*") if p.is_file())
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in files}


def _generator_hash() -> str:
    """The generator's source (this module and the tiny model's): a changed one invalidates assets made by the old."""
    sources = [Path(__file__), Path(tinymodel.__file__)]
    return hashlib.sha256("".join(sha256_file(p) for p in sources).encode()).hexdigest()


def _valid_manifest(out: Path, request: dict) -> Optional[dict]:
    """The manifest when it matches the request and every file it lists is intact, else None."""
    try:
        manifest = json.loads((out / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in request.items()):
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or files != _file_hashes(out):
        return None
    return manifest


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line: generate (or reuse) the assets and print a one-line summary."""
    parser = argparse.ArgumentParser(prog="python -m qloraflow.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/demo", help="Output folder (default: build/demo).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything generated (default: 0).")
    parser.add_argument("--n-train", type=int, default=2000, help="Clean train records (default: 2000).")
    parser.add_argument("--n-test", type=int, default=100, help="Test records (default: 100).")
    args = parser.parse_args(argv)
    # Read when transformers is imported: a bar for one 7 MB shard is noise next to the summary line.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    try:
        m = generate_demo_assets(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))  # exit status 2 with the message, no traceback
    c = m["counts"]
    print(f"demo assets in {args.out} (seed {m['seed']}, {'reused' if m['reused'] else 'generated'} in "
          f"{time.perf_counter() - start:.1f} s): {c['train_records']} train + {c['planted']} planted problems, "
          f"{c['test_records']} test, db {c['customers']}/{c['products']}/{c['orders']} rows, "
          f"vocab {m['tokenizer']['vocab']}, model {m['model']['params'] / 1e6:.1f}M params")
    return m


if __name__ == "__main__":
    main()
