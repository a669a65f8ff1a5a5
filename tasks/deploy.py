"""Deploy task: serve the merged model on vLLM, smoke-test it, compare with Hugging Face generate."""

from __future__ import annotations

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow.agreement import annotate_mismatches, check_served_model
from qloraflow.reports import deploy_html, latency_percentiles, page_html
from qloraflow.serve import VllmServer, compare_with_hf, smoke_test_server
from qloraflow.stages import DeployResult, DeploySettings, MergeResult, RunContext
from tasks import policy
from tasks.common import local_folder, print_line, show_deck, stage_run, work_dir


@task(cache=policy.cache("deploy"), container_image=policy.SERVE_IMAGE, requests=policy.SERVE_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def deploy_model(settings: DeploySettings, merged_dir: FlyteDirectory, merged: MergeResult,
                 context: RunContext) -> DeployResult:
    """Start vLLM on 127.0.0.1, run the smoke suite, stop it; check every served token against the merged model.

    Passes when the smoke suite passes and every served token is the merged model's float32 greedy choice up
    to a near-tie (``qloraflow.agreement``); the share of answers identical to HF ``generate`` is reported too.
    """
    if not settings.serve.enabled:
        page = deploy_html({"skipped": "serve.enabled is false"})
        show_deck({"deployment": page})
        return DeployResult(passed=False, skipped="serve.enabled is false", report_html=page_html("deploy", page))
    samples = merged.samples
    # The same test prompts the merged model answered with HF generate: chats, and the rendered text raw,
    # each under its record id.
    prompts = [{"id": rid, "messages": s.messages, "prompt": s.prompt} for rid, s in samples.items()]
    log = work_dir("deploy") / "vllm.log"
    with stage_run(context, "deploy") as tracker:
        try:
            with VllmServer(local_folder(merged_dir), settings.serve, log,
                            served_model_name=settings.served_model_name) as srv:
                report = smoke_test_server(srv.base_url, srv.model_name, prompts, max_tokens=settings.max_new_tokens,
                                           api_key=srv.api_key)
        finally:
            if log.exists():
                tracker.log_artifact(log, "deploy")  # the server's log, also when it failed
        report.update(port=srv.port, pid=srv.pid)  # stopped by now: the with-block ends the whole process group
        # Identical text is not the test (bf16 kernels flip near-ties); every served token being the merged
        # model's float32 choice up to a near-tie is (qloraflow/agreement.py). Both are reported.
        tokens = check_served_model(local_folder(merged_dir), settings.serve.dtype,
                                    {rid: s.prompt for rid, s in samples.items()}, report["chat_token_ids_by_id"])
        report["served_tokens"] = tokens
        report["hf_agreement"] = annotate_mismatches(
            compare_with_hf(report["chat_answers_by_id"], {rid: s.answer for rid, s in samples.items()}), tokens)
        report["smoke_passed"] = report["passed"]
        report["passed"] = bool(report["passed"] and tokens["passed"])
        tracker.log_dict({"served_tokens": tokens, "hf_agreement": report["hf_agreement"]}, "deploy/served_vs_merged.json")
        lat = latency_percentiles(report["latency"])  # p50/p95 of the chat and completion requests
        tracker.log_metrics({"smoke_passed": float(report["smoke_passed"]), "hf_agreement": report["hf_agreement"]["share"],
                             "served_tokens_passed": float(tokens["passed"]),
                             "served_answers_all_argmax": tokens.get("answers_all_argmax", 0) / max(tokens["n"], 1),
                             **({"served_worst_margin_ulps": tokens["worst_margin_ulps"]}
                                if tokens.get("worst_margin_ulps") is not None else {}),
                             **{k: v for k, v in lat.items() if isinstance(v, (int, float))}})
    report["mlflow_run_id"] = tracker.run_id
    page = deploy_html(report, [s.messages[-1]["content"] for s in samples.values() if s.messages])
    show_deck({"deployment": page})
    print_line("deploy", f"smoke {'passed' if report['smoke_passed'] else 'FAILED'}; served tokens "
                         f"{'= merged model up to near-ties' if tokens['passed'] else 'DIFFER from the merged model'} "
                         f"(worst {tokens.get('worst_margin_ulps')} near-tie steps, failed {tokens['failed'][:5]}); "
                         f"identical to HF generate {report['hf_agreement']['share']:.2%} "
                         f"({report['hf_agreement']['near_tie_mismatches']} of the "
                         f"{len(report['hf_agreement']['mismatches'])} others start at a near-tie); "
                         f"first answer: {report['chat_answers'][:1]}")
    return DeployResult(passed=bool(report["passed"]), hf_agreement=float(report["hf_agreement"]["share"]),
                        chat_answers={rid: str(a) for rid, a in report["chat_answers_by_id"].items()},
                        latency={k: float(v) for k, v in lat.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)},
                        port=srv.port, pid=srv.pid, mlflow_run_id=tracker.run_id,
                        report_html=page_html("deploy", page))
