"""Random JSONL bytes through the whole data stage: only the documented errors, and every record counted."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qloraflow.config import DataConfig
from qloraflow.data import prepare_dataset
from qloraflow.errors import DataValidationError

BOM = b"\xef\xbb\xbf"
KEYS = ["instruction", "input", "output", "system", "text", "messages", "conversations", "role", "content",
        "from", "value", "type"]
ROLES = ["user", "assistant", "system", "developer", "tool", "human", "gpt", "GPT", ""]

# Any JSON value, with the keys the readers look for over-represented.
leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4),
                                                                      inner, max_size=5),
    max_leaves=12)
# Text with what cleaning must handle: controls, CR, full-width, spaces, lone surrogates, repeats.
messy_text = st.lists(st.sampled_from(list("ab 1\t\r\n\x00\x07\ufeff\u3000Ａ\u2028@.") + ["\ud800", "spam "]),
                      max_size=40).map("".join)
turn = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": messy_text | json_value})
sharegpt_turn = st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": messy_text})
record = st.one_of(
    json_value,
    st.fixed_dictionaries({"instruction": messy_text, "output": messy_text | json_value},
                          optional={"input": messy_text | st.none(), "system": messy_text}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt_turn, max_size=4)}),
    st.fixed_dictionaries({"text": messy_text | json_value}),
)
plain = st.text(alphabet="abcdefgh 0123\n", min_size=1, max_size=40)
good_alpaca = st.fixed_dictionaries({"instruction": plain, "output": plain}, optional={"input": plain})
line = st.one_of(
    good_alpaca.map(lambda v: json.dumps(v).encode()),
    record.map(lambda v: json.dumps(v).encode()),
    # Raw UTF-8 with lone surrogates written out: bytes that are not UTF-8.
    record.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    record.map(lambda v: json.dumps(v)[: len(json.dumps(v)) // 2].encode()),  # truncated
    st.binary(max_size=30),
)


def count_lines(data: bytes) -> int:
    """Records the stage must account for: every line with something other than whitespace."""
    return sum(1 for raw in data.split(b"\n") if raw.removeprefix(BOM).strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(line, max_size=10), crlf=st.booleans(), bom=st.booleans(),
       reject_rate=st.sampled_from([0.0, 0.5, 1.0]), redact=st.booleans(), max_chars=st.sampled_from([30, 20000]))
def test_random_jsonl_is_always_accounted_for(lines, crlf, bom, reject_rate, redact, max_chars):
    data = (BOM if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "fuzz.jsonl", Path(tmp) / "out"
        path.write_bytes(data)
        cfg = DataConfig(train_files=[str(path)], validation_fraction=0.3, max_reject_rate=reject_rate,
                         redact_pii=redact, max_chars=max_chars)
        try:
            report = prepare_dataset(cfg, out)
            kept = sum(pq.read_metadata(out / f"{s}.parquet").num_rows for s in ("train", "validation", "test"))
        except DataValidationError:  # EmptyDatasetError included; the report is still written
            report = json.loads((out / "report.json").read_text())
            kept = report["kept"]
            assert not any(out.glob("*.parquet"))
        quarantined = len((out / "quarantine.jsonl").read_text().splitlines())
        assert report["read"] == count_lines(data) == kept + quarantined
        assert report["rejected"] == quarantined
        event(f"some record kept: {kept > 0}")
        for reason in report["rejected_by_reason"]:
            event(f"rejected for {reason}")
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
