"""Merge task: fold the adapter into 16-bit base weights, verify the result, evaluate what will be served."""

from __future__ import annotations

import typing
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow.errors import MergeVerificationError
from qloraflow.evaluate import evaluate_model
from qloraflow.merge import compare_answers, merge_and_verify, probe_rows
from qloraflow.reports import merge_html, page_html
from qloraflow.stages import EvalResult, MergeCheck, MergeResult, MergeSettings, RunContext, Sample
from tasks import policy
from tasks.common import print_line, show_deck, stage_run, work_dir

MergeOutput = typing.NamedTuple("MergeOutput", [("merged_dir", FlyteDirectory), ("result", MergeResult)])


@task(cache=policy.cache("merge"), container_image=policy.TRAIN_IMAGE, requests=policy.EVAL_RESOURCES,
      accelerator=policy.TRAIN_ACCELERATOR, retries=policy.RETRIES, enable_deck=True)
def merge_model(settings: MergeSettings, train_dir: FlyteDirectory, data_dir: FlyteDirectory,
                tok_dir: FlyteDirectory, candidate: EvalResult, context: RunContext) -> MergeOutput:
    """Merged safetensors in the training dtype; fails unless weights, outputs and metrics match the adapter."""
    cfg = settings.config()
    merged = work_dir("merge") / "merged_model"
    with stage_run(context, "merge") as tracker:
        adapter = Path(train_dir.download()) / "adapter"
        data, tok = data_dir.download(), tok_dir.download()
        info = merge_and_verify(cfg.model.base_model, adapter, merged, cfg.model.compute_dtype,
                                probe_rows(tok, cfg.merge.probe_samples), cfg.merge.kl_factor)
        result = evaluate_model(cfg, str(merged), data, tok)  # the model that is served
        metrics = result.metrics
        gate = cfg.eval.gate_metric
        adapter_metric = candidate.metrics["candidate"][gate]
        drop = adapter_metric - metrics[gate]
        if drop > cfg.merge.metric_tolerance:
            raise MergeVerificationError(f"merged model scores {gate}={metrics[gate]:.4f}, the adapter "
                                         f"{adapter_metric:.4f}: a drop of {drop:.4f} > merge.metric_tolerance "
                                         f"{cfg.merge.metric_tolerance}")
        check = info["verify"]
        # The merged model's answers against the adapter's, record by record (matched by id).
        adapter_answers = {rid: s.answer for rid, s in candidate.samples["candidate"].items()}
        same = compare_answers(result.answers, adapter_answers)
        info.update(metrics=metrics, samples=result.samples, metric_drop=drop, answer_agreement=same,
                    generation_tokens_per_s=result.tokens_per_s)
        tracker.log_metrics({f"merged.{k}": v for k, v in metrics.items()})
        tracker.log_metrics({"merge_mean_kl": check["outputs"]["mean_kl"], "merge_kl_bound": check["kl_bound"],
                             "merge_greedy_agreement": check["outputs"]["greedy_agreement"],
                             "merge_worst_ulps": check["weights"]["worst_ulps"],
                             "merge_delta_lost_share": check["weights"]["delta_lost_share"],
                             "merge_answer_agreement": same, "merged_bytes": info["bytes"]})
    info["mlflow_run_id"] = tracker.run_id
    page = merge_html(info)
    show_deck({"merge check": page})
    print_line("merge", f"{merged} ({info['bytes'] / 2**20:.1f} MiB {info['dtype']}); weights within "
                        f"{check['weights']['worst_ulps']:.2f} ulp of base + adapter; mean KL "
                        f"{check['outputs']['mean_kl']:.2e} (bound {check['kl_bound']:.2e}), greedy agreement "
                        f"{check['outputs']['greedy_agreement']:.2%}; {gate} {metrics[gate]:.3f}")
    verified = MergeCheck(worst_ulps=float(check["weights"]["worst_ulps"]),
                          delta_lost_share=float(check["weights"]["delta_lost_share"]),
                          mean_kl=float(check["outputs"]["mean_kl"]), kl_bound=float(check["kl_bound"]),
                          greedy_agreement=float(check["outputs"]["greedy_agreement"]))
    return MergeOutput(merged_dir=FlyteDirectory(str(merged)), result=MergeResult(
        sha256=info["sha256"], bytes=int(info["bytes"]), dtype=info["dtype"], check=verified,
        metrics={k: float(v) for k, v in metrics.items()}, metric_drop=float(drop),
        samples=Sample.keyed(result.samples), mlflow_run_id=tracker.run_id,
        report_html=page_html("merge", page)))
