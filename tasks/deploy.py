"""Deploy task: serve the merged model on vLLM, smoke-test it, compare with Hugging Face generate."""

from __future__ import annotations

import json
import typing

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow.reports import deploy_html
from qloraflow.serve import VllmServer, compare_with_hf, smoke_test_server
from tasks import policy
from tasks.common import config_of, local_folder, print_line, stage_run, work_dir

DeployOutput = typing.NamedTuple("DeployOutput", [("report", str)])


@task(cache=policy.cache("deploy"), container_image=policy.SERVE_IMAGE, requests=policy.SERVE_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def deploy_model(config_yaml: str, serve_key: str, merged_dir: FlyteDirectory, merge_report: str,
                 pipeline_run_id: str) -> DeployOutput:
    """Start vLLM on 127.0.0.1, run the smoke suite, stop it; report answers, latency and HF agreement."""
    cfg = config_of(config_yaml)
    if not cfg.serve.enabled:
        return DeployOutput(report=json.dumps({"passed": False, "skipped": "serve.enabled is false"}))
    samples = json.loads(merge_report)["samples"]
    # The same test prompts the merged model answered with HF generate: chats, and the rendered text raw.
    prompts = [{"messages": s["messages"], "prompt": s["prompt"]} for s in samples]
    log = work_dir("deploy") / "vllm.log"
    with stage_run(cfg, "deploy", pipeline_run_id) as tracker:
        try:
            with VllmServer(local_folder(merged_dir), cfg.serve, log, served_model_name=cfg.registry.model_name) as srv:
                report = smoke_test_server(srv.base_url, srv.model_name, prompts, max_tokens=cfg.eval.max_new_tokens)
        finally:
            if log.exists():
                tracker.log_artifact(log, "deploy")  # the server's log, also when it failed
        report.update(port=srv.port, pid=srv.pid)  # stopped by now: the with-block ends the whole process group
        report["hf_agreement"] = compare_with_hf(report["chat_answers"], [s["answer"] for s in samples])
        lat = report["latency"]
        tracker.log_metrics({"smoke_passed": float(report["passed"]), "hf_agreement": report["hf_agreement"]["share"],
                             **{k: v for k, v in lat.items() if isinstance(v, (int, float))}})
    report["mlflow_run_id"] = tracker.run_id
    Deck("deployment", deploy_html(report))
    print_line("deploy", f"smoke {'passed' if report['passed'] else 'FAILED'}; HF agreement "
                         f"{report['hf_agreement']['share']:.2%}; first answer: {report['chat_answers'][:1]}")
    return DeployOutput(report=json.dumps(report, default=str))
