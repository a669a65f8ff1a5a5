"""Serve a model folder with vLLM's OpenAI-compatible server and smoke-test it.

The server runs in a *separate* Python (the serving environment, ``ServeConfig.python``), as a
serving container would; this module only starts it, waits for ``/health``, talks HTTP to it and
stops it. So the training environment needs no vLLM, only the ``openai`` client::

    from qloraflow.config import ServeConfig
    from qloraflow.serve import VllmServer, smoke_test_server

    cfg = ServeConfig(python="/opt/venv-serve/bin/python")
    with VllmServer("outputs/merged", cfg, "outputs/serve.log") as srv:
        report = smoke_test_server(srv.base_url, srv.model_name,
                                   [{"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi"}],
                                   api_key=srv.api_key)
    assert report["passed"], report["checks"]

The server is keyed: every request but ``GET /health`` needs ``Authorization: Bearer <srv.api_key>``
(a new random key per server unless one is given; it reaches vLLM as ``VLLM_API_KEY`` in its
environment, not in argv, and ``qloraflow.keyguard`` closes the paths vLLM's own check leaves open).

Serving base + adapter without merging: ``VllmServer(base_dir, cfg, log, lora_modules={"sql": adapter_dir})``
and ask for model ``"sql"``.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from qloraflow import keyguard
from qloraflow.config import ServeConfig
from qloraflow.errors import ServeError
from qloraflow.paired import RecordMismatchError, match_ids

LOG_TAIL_LINES = 40
# vLLM only accepts these LoRA ranks; an adapter of rank r needs the next one up.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------------------------
# Processes and ports
# ---------------------------------------------------------------------------------------------


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Reads ``/proc`` rather than ``os.killpg(pgid, 0)``: where PID 1 does not reap orphans (some
    container inits), dead children stay zombies forever and would still count as members.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to signal 0, which counts zombies too
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_group_members(pgid):
            return True
        time.sleep(0.1)
    return not process_group_members(pgid)


def read_log_tail(path: str | os.PathLike, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))  # 40 lines of vLLM log fit well within 64 KiB
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def _lora_rank(adapter_dir: str) -> int:
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        raise ServeError(f"{cfg_path} not found: --lora-modules needs a PEFT adapter folder "
                         "(the one save_pretrained wrote, with adapter_config.json)")
    r = int(json.loads(cfg_path.read_text()).get("r", 16))
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ServeError(f"{cfg_path}: LoRA rank {r} is above vLLM's maximum {_VLLM_LORA_RANKS[-1]}; "
                     "merge the adapter and serve the merged model instead")


class VllmServer:
    """vLLM's OpenAI server for one model folder, as a context manager.

    The server runs as ``<serve python> -m vllm.entrypoints.openai.api_server`` (the ``vllm``
    console script of the CPU build cannot find its own metadata) in its own session, so that
    stopping it can signal the whole process group: vLLM forks an engine-core process that would
    otherwise outlive the API server and keep the memory and the port.

    Attributes:
        base_url: ``http://host:port/v1`` once started.
        pid: Process id (also the process-group id) of the API server; kept after ``stop()`` so
            callers can check that the group is gone.
        port: The port served (picked when ``cfg.port`` is 0).
        model_name: The name clients ask for (``--served-model-name``).
        api_key: The bearer key every request but ``GET /health`` must send.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        cfg: ServeConfig,
        log_path: str | os.PathLike,
        *,
        served_model_name: Optional[str] = None,
        lora_modules: Optional[dict[str, str]] = None,
        enforce_eager: Optional[bool] = None,
        extra_args: Sequence[str] = (),
        stop_grace_s: Optional[float] = None,
        api_key: Optional[str] = None,
    ):
        """Describe the server; nothing starts before ``start()`` or ``with``.

        Args:
            model_dir: Local model folder (config.json, weights, tokenizer with its chat template).
            cfg: The ``serve`` section of the config.
            log_path: File that receives the server's stdout and stderr.
            served_model_name: Name clients use; defaults to the folder name.
            lora_modules: ``{name: adapter_dir}`` to serve adapters on top of ``model_dir``
                without merging (``--enable-lora``); clients then ask for ``name``.
            enforce_eager: Skip vLLM's torch.compile warm-up (and CUDA graphs on a GPU): the
                server is up about a minute sooner on the CPU and decodes slower. None: ``cfg``'s.
            extra_args: More vLLM arguments, appended as given.
            stop_grace_s: Seconds between SIGTERM and SIGKILL when stopping. None: ``cfg``'s.
            api_key: Key clients must send. None: a new one for this server (``secrets.token_urlsafe``),
                so a server is never up without one; pass it to ``smoke_test_server`` and clients.
        """
        self.model_dir = os.path.abspath(model_dir)
        self.cfg = cfg
        self.log_path = Path(log_path)
        self.model_name = served_model_name or Path(self.model_dir).name
        self.lora_modules = dict(lora_modules or {})
        self.enforce_eager = cfg.enforce_eager if enforce_eager is None else enforce_eager
        self.extra_args = list(extra_args)
        self.stop_grace_s = cfg.stop_grace_s if stop_grace_s is None else stop_grace_s
        self.api_key = api_key or secrets.token_urlsafe(32)
        self._middleware_dir: Optional[str] = None
        self.port: Optional[int] = None
        self.pid: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log_file: Any = None

    @property
    def root_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def python(self) -> str:
        """Absolute path of the serving Python; relative config paths are taken from the cwd.

        ``abspath``, not ``resolve``: a venv's python is a symlink to the system one, and following
        it would lose the venv's site-packages.
        """
        return os.path.abspath(self.cfg.python)

    def command(self) -> list[str]:
        """The full argument list the server is started with."""
        cmd = [
            self.python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--host", self.cfg.host,
            "--port", str(self.port),
            # The CPU build otherwise reserves 92% of the machine's memory and refuses to start.
            "--kv-cache-memory-bytes", str(self.cfg.kv_cache_memory_bytes),
            "--max-model-len", str(self.cfg.max_model_len),
            "--dtype", self.cfg.dtype,
            "--served-model-name", self.model_name,
            # The key itself is in the environment (VLLM_API_KEY), not here: argv is public in `ps`.
            "--middleware", keyguard.MIDDLEWARE,
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.lora_modules:
            rank = max(_lora_rank(path) for path in self.lora_modules.values())
            cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(self.lora_modules)),
                    "--lora-modules", *(f"{name}={os.path.abspath(p)}" for name, p in self.lora_modules.items())]
        return cmd + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The serving venv is a different interpreter: a PYTHONPATH meant for the caller's venv
        # would shadow its packages (e.g. a newer transformers than vLLM accepts).
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        # Everything is local: never reach for the Hub, never phone home.
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
        # vLLM checks the key on /v1 itself; the keyguard middleware (its only PYTHONPATH entry) on the rest.
        env[keyguard.ENV_KEY] = self.api_key
        if self._middleware_dir:
            env["PYTHONPATH"] = self._middleware_dir
        return env

    def _check_inputs(self) -> None:
        problems = []
        if not os.path.isfile(self.python()):
            problems.append(f"serve.python {self.cfg.python!r} ({self.python()}) does not exist; point "
                            "serve.python at the interpreter of the environment where vllm is installed")
        if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            problems.append(f"{self.model_dir} has no config.json; serve a saved model folder "
                            "(the save_pretrained output of the merge step)")
        for path in self.lora_modules.values():
            _lora_rank(path)  # raises with the file named
        if problems:
            raise ServeError("; ".join(problems))

    def start(self) -> "VllmServer":
        """Start the server and wait until ``/health`` answers 200.

        Raises:
            ServeError: inputs are missing, the process exits before it is healthy, or
                ``cfg.startup_timeout_s`` passes first. The message holds the log's last lines;
                the process group is gone by the time it is raised.
        """
        if self._proc is not None:
            raise ServeError(f"server for {self.model_dir} is already started (pid {self.pid}); stop() it first")
        self._check_inputs()
        self.port = self.cfg.port or find_free_port(self.cfg.host)
        if not port_is_free(self.cfg.host, self.port):
            raise ServeError(f"serve.port {self.port} on {self.cfg.host} is in use; "
                             "stop what listens there or set serve.port: 0 to pick a free port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._middleware_dir = str(keyguard.write_module(tempfile.mkdtemp(prefix="qloraflow-keyguard-")))
        self._log_file = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self._env(), start_new_session=True,  # own process group: stop() signals all of it
        )
        self.pid = self._proc.pid
        atexit.register(self.stop)  # no orphan server if the caller forgets stop() or dies on an error
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        started = time.monotonic()
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServeError(
                    f"vLLM server for {self.model_dir} exited with code {code} after "
                    f"{time.monotonic() - started:.0f} s, before /health answered. "
                    f"Last lines of {self.log_path}:\n{read_log_tail(self.log_path)}")
            if self.health():
                return
            if time.monotonic() > deadline:
                raise ServeError(
                    f"vLLM server for {self.model_dir} was not healthy after serve.startup_timeout_s="
                    f"{self.cfg.startup_timeout_s:g} s; raise it if the model is large. "
                    f"Last lines of {self.log_path}:\n{read_log_tail(self.log_path)}")
            time.sleep(0.5)

    def health(self, timeout_s: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM the whole process group; SIGKILL what is left after ``stop_grace_s``.

        Idempotent. Returns once no process of the group is alive (the engine core included) and
        the API server is reaped, so the port is free.
        """
        if self._proc is None:
            return
        pgid = self._proc.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(pgid, self.stop_grace_s):
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, 10.0)
        try:
            self._proc.wait(timeout=10.0)  # reap the leader: no zombie of ours
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()
        shutil.rmtree(self._middleware_dir, ignore_errors=True)
        self._proc = None
        atexit.unregister(self.stop)
        left = process_group_members(pgid)
        if left:  # warn, not raise: stop() runs in __exit__ and must not hide the caller's exception
            warnings.warn(f"processes {left} of vLLM's process group {pgid} survived SIGKILL", RuntimeWarning)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Smoke suite (runs in the caller's environment: it only needs HTTP and the openai client)
# ---------------------------------------------------------------------------------------------


def _check_prompts(prompts: list[dict]) -> tuple[list[list[dict]], list[str]]:
    chats, raws = [], []
    for i, p in enumerate(prompts):
        if "messages" not in p and "prompt" not in p:
            raise ServeError(f"prompts[{i}] has neither 'messages' (a chat) nor 'prompt' (raw text); "
                             "give one or both")
        if "messages" in p:
            chats.append(p["messages"])
        if "prompt" in p:
            raws.append(p["prompt"])
    if not chats or not raws:
        missing = "'messages'" if not chats else "'prompt'"
        raise ServeError(f"no smoke prompt has {missing}: the suite checks chat, completion and "
                         "streaming, so give at least one prompt with 'messages' and one with 'prompt'")
    return chats, raws


def _run_check(name: str, checks: dict, fn) -> Any:
    """Run one check; record pass/fail with the error instead of stopping the suite."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - every failure of a check is a failed check
        checks[name] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        return None
    checks[name] = {"passed": True, "error": None}
    return value


def smoke_test_server(
    base_url: str,
    model_name: str,
    prompts: list[dict],
    *,
    max_tokens: int = 32,
    timeout_s: float = 60.0,
    api_key: Optional[str] = None,
) -> dict:
    """Chat, completion and streaming requests against an OpenAI-compatible server, all greedy; unkeyed ones refused.

    Chat requests send messages only: the server renders them with the model's own chat template
    (the training template saved with the tokenizer), which is the point of the check.

    Args:
        base_url: ``http://host:port/v1``.
        model_name: The served model (or LoRA module) name.
        prompts: Dicts with ``messages`` (a chat) and/or ``prompt`` (raw text), and an optional
            ``id`` (the test record's). Every chat is sent to /v1/chat/completions, every raw prompt
            to /v1/completions, and the first chat again as a streaming request.
        max_tokens: Generation limit per request.
        timeout_s: Bound on each request (the streaming one included, end to end).
        api_key: The server's key (``VllmServer.api_key``). None: ``$VLLM_API_KEY``, as in a pod.

    Returns:
        ``{"passed": bool, "checks": {"chat"|"completion"|"stream"|"auth": {"passed", "error"}},
        "chat_answers": [...], "chat_answers_by_id": {id: answer}, "chat_token_ids_by_id": {id: [token ids]},
        "completion_answers": [...], "stream_answer": str,
        "latency": {"chat_s": [...], "completion_s": [...], "ttft_s", "stream_s",
        "stream_output_tokens", "output_tokens_per_s"}}``. A check passes when every answer is
        non-empty after ``strip()``; ``auth`` passes when requests without the key get 401 (see
        :func:`check_key_required`). ``output_tokens_per_s`` is the decode rate after the first
        token: (tokens - 1) / (last token time - first token time).

    Raises:
        ServeError: ``prompts`` lacks a chat or a raw prompt.
    """
    chats, raws = _check_prompts(prompts)
    from openai import OpenAI  # the client only: importable in the training environment

    key = api_key or os.environ.get(keyguard.ENV_KEY) or "EMPTY"
    client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
    checks: dict[str, dict] = {}
    latency: dict[str, Any] = {"chat_s": [], "completion_s": []}

    token_ids: list[Optional[list[int]]] = []

    def chat() -> list[str]:
        answers = []
        for messages in chats:
            t0 = time.perf_counter()
            # The answer's token ids too (vLLM writes them as "token_id:<id>"), for check_served_tokens.
            r = client.chat.completions.create(model=model_name, messages=messages, temperature=0.0,
                                               max_tokens=max_tokens, logprobs=True,
                                               extra_body={"return_tokens_as_token_ids": True})
            latency["chat_s"].append(time.perf_counter() - t0)
            answers.append(r.choices[0].message.content or "")
            token_ids.append(_token_ids(r.choices[0].logprobs))
        _require_non_empty("chat", answers)
        return answers

    def completion() -> list[str]:
        answers = []
        for prompt in raws:
            t0 = time.perf_counter()
            r = client.completions.create(model=model_name, prompt=prompt, temperature=0.0, max_tokens=max_tokens)
            latency["completion_s"].append(time.perf_counter() - t0)
            answers.append(r.choices[0].text or "")
        _require_non_empty("completion", answers)
        return answers

    def stream() -> str:
        text, stats = _stream_chat(client, model_name, chats[0], max_tokens, timeout_s)
        latency.update(stats)
        _require_non_empty("stream", [text])
        return text

    chat_answers = _run_check("chat", checks, chat) or []
    # Each chat answer under its prompt's record id (the prompt's position when it has none).
    chat_ids = [str(p.get("id") or k) for k, p in enumerate(prompts) if "messages" in p]
    completion_answers = _run_check("completion", checks, completion) or []
    stream_answer = _run_check("stream", checks, stream) or ""
    _run_check("auth", checks, lambda: check_key_required(base_url, model_name, chats[0], timeout_s))
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "chat_answers": chat_answers,
        "chat_answers_by_id": dict(zip(chat_ids, chat_answers)),
        "chat_token_ids_by_id": {i: t for i, t in zip(chat_ids, token_ids) if t is not None},
        "completion_answers": completion_answers,
        "stream_answer": stream_answer,
        "latency": latency,
    }


def _token_ids(logprobs: Any) -> Optional[list[int]]:
    """The answer's token ids from vLLM's logprobs with ``return_tokens_as_token_ids`` (None without them)."""
    content = getattr(logprobs, "content", None)
    if content is None:
        return None
    try:
        return [int(t.token.removeprefix("token_id:")) for t in content]
    except ValueError:  # a server that ignored return_tokens_as_token_ids
        return None


def unkeyed_status(url: str, body: Optional[dict] = None, timeout_s: float = 10.0) -> int:
    """HTTP status of one request that sends no key (GET, or POST of ``body`` as JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def check_key_required(base_url: str, model_name: str, messages: list[dict], timeout_s: float = 10.0) -> None:
    """A chat without the key is refused (401) on ``/v1`` and on vLLM's other generation route.

    ``/invocations`` reaches the same chat handler outside ``/v1``, where vLLM's own key check
    does not look (``qloraflow.keyguard``).

    Raises:
        ServeError: naming each path that did not answer 401.
    """
    root = base_url.rstrip("/").removesuffix("/v1")
    chat = {"model": model_name, "messages": messages, "max_tokens": 1}
    got = {path: unkeyed_status(f"{root}{path}", chat, timeout_s) for path in ("/v1/chat/completions", "/invocations")}
    open_paths = {path: code for path, code in got.items() if code != 401}
    if open_paths:
        raise ServeError(f"requests without the API key were not refused (401): {open_paths}; start vLLM "
                         f"with {keyguard.ENV_KEY} set and --middleware {keyguard.MIDDLEWARE}")


def _require_non_empty(check: str, answers: list[str]) -> None:
    empty = [i for i, a in enumerate(answers) if not a.strip()]
    if empty:
        raise ServeError(f"{check}: empty answer for prompt(s) {empty}")


def _stream_chat(client: Any, model_name: str, messages: list[dict], max_tokens: int,
                 timeout_s: float) -> tuple[str, dict]:
    """One streamed chat completion: the assembled text, time to first token and decode rate."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model_name, messages=messages, temperature=0.0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True},  # exact token count in the last chunk
    )
    parts: list[str] = []
    t_first = t_last = None
    n_content_chunks, usage_tokens = 0, None
    try:
        for chunk in stream:
            now = time.perf_counter()
            if now - t0 > timeout_s:  # the client's timeout bounds each read, not the whole stream
                raise ServeError(f"stream: not finished after {timeout_s:g} s")
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                    n_content_chunks += 1
                    t_first = t_first or now
                    t_last = now
    finally:
        stream.close()
    t_end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else n_content_chunks
    decode_s = (t_last - t_first) if t_first is not None else 0.0
    return "".join(parts), {
        "ttft_s": (t_first - t0) if t_first is not None else None,
        "stream_s": t_end - t0,
        "stream_output_tokens": tokens,
        "output_tokens_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None,
    }


def compare_with_hf(answers_vllm: Mapping[str, str], answers_hf: Mapping[str, str]) -> dict:
    """Share of identical greedy answers (after ``strip()``) between vLLM and HF ``generate``, by record id.

    Trailing U+FFFD characters are dropped too: when ``max_tokens`` cuts an answer inside a
    multi-byte character, vLLM's incremental detokenizer withholds the incomplete bytes while HF
    ``decode`` renders each as U+FFFD. Same tokens, different rendering; not a disagreement.

    Args:
        answers_vllm: Answers from the server, ``{record id: answer}``.
        answers_hf: Answers from HF ``generate`` to the same records, ``{record id: answer}`` (any order).

    Returns:
        ``{"n": int, "identical": int, "share": float, "mismatches": [{"id", "vllm", "hf"}]}``.

    Raises:
        ServeError: a record id is answered on one side only (named), or there is no answer.
    """
    try:
        ids = match_ids(answers_vllm, answers_hf, "the vLLM answers", "the HF answers")
    except RecordMismatchError as e:
        raise ServeError(f"compare_with_hf: {e}") from e

    def norm(answer: str) -> str:
        return answer.strip().rstrip("\ufffd").rstrip()

    mismatches = [{"id": i, "vllm": answers_vllm[i], "hf": answers_hf[i]}
                  for i in ids if norm(answers_vllm[i]) != norm(answers_hf[i])]
    identical = len(ids) - len(mismatches)
    return {"n": len(ids), "identical": identical, "share": identical / len(ids), "mismatches": mismatches}
