"""Register task: the merged model into the MLflow registry, the promotion gate, the pipeline summary.

Never cached: the champion it compares against changes between executions. A merged model already
registered (same content digest: weights, config, tokenizer) is not registered again, so rerunning
on unchanged inputs adds no version, while any change that alters the model does.

Pipelines may run at once against one registry and one ``output_dir``: each execution writes its
summary to ``<output_dir>/<name>/runs/<mlflow run id>/summary.json`` (and atomically replaces
``<output_dir>/<name>/summary.json``, the latest), and the champion's serving manifests move their
``current`` pointer under a lock, only to the version that holds the alias.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow import registry
from qloraflow.evaluate import evaluate_model
from qloraflow.stages import (DataResult, DeployResult, EvalResult, MergeResult, RegisterSettings, RunContext,
                              TokenizeResult, TrainResult)
from qloraflow.tracking import MlflowTracker
from tasks import policy
from tasks.common import execution_id, local_folder, print_line


def _champion_metrics(cfg, client, data: str, tok: str, test_key: str) -> dict:  # noqa: ANN001
    """The champion's metrics on this test split: from its tags when measured on it, else re-evaluated."""
    current = registry.champion(client, cfg.registry.model_name)
    if current is None:
        return {}
    tags = current.tags or {}
    if tags.get("eval_key") == test_key:
        return {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=current.source, tracking_uri=client.tracking_uri)
    return evaluate_model(cfg, local, data, tok).metrics


def _report(folder: str, run_id: str) -> dict:
    """A stage's whole report (``report.json`` in its output folder) with the stage's MLflow run."""
    return {**json.loads((Path(folder) / "report.json").read_text()), "mlflow_run_id": run_id}


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def register_and_promote(settings: RegisterSettings, context: RunContext, data: DataResult, data_dir: FlyteDirectory,
                         tokenized: TokenizeResult, tok_dir: FlyteDirectory, trained: TrainResult,
                         evaluated: EvalResult, merged: MergeResult, merged_dir: FlyteDirectory,
                         deployed: DeployResult) -> str:
    """Log the pipeline's results, register the merged model, gate the champion alias; return the summary."""
    cfg = settings.config
    name = cfg.registry.model_name
    pipeline_run_id = context.pipeline_run_id
    data_local, tok_local = data_dir.download(), tok_dir.download()
    results = {k: dict(v) for k, v in evaluated.metrics.items()}
    train = dataclasses.asdict(trained)
    deploy = {k: v for k, v in dataclasses.asdict(deployed).items() if k != "skipped" or v}
    merge = dataclasses.asdict(merged)
    reports = {"data": _report(data_local, data.mlflow_run_id), "tokenize": _report(tok_local, tokenized.mlflow_run_id),
               "train": train, "evaluate": {"mlflow_run_id": evaluated.mlflow_run_id}, "merge": merge,
               "deploy": deploy}
    tracker = MlflowTracker(context.experiment, context.tracking_uri, run_id=pipeline_run_id)
    client = registry.client_for(context.tracking_uri)
    stages = stage_provenance(client, pipeline_run_id, reports)
    test_key = f"{settings.eval_digest}:{settings.data_digest}"
    results["champion"] = _champion_metrics(cfg, client, data_local, tok_local, test_key)
    results["merged"] = dict(merged.metrics)
    for model, metrics in results.items():
        tracker.log_metrics({f"{model}.{k}": v for k, v in metrics.items()})

    version = registry.version_with_digest(client, name, merged.sha256)
    created = False
    if version is None:  # upload outside the registry lock; register_once re-checks under it
        tracker.log_artifact(local_folder(merged_dir), "merged_model")
        tracker.log_dict({"data": reports["data"], "tokenize": reports["tokenize"], "train": train,
                          "eval": results, "merge": {k: v for k, v in merge.items() if k != "samples"},
                          "deploy": deploy}, "pipeline_report.json")
        tags = {"train_key": settings.train_digest, "data_key": settings.data_digest, "eval_key": test_key,
                "dataset.hash": settings.data_digest, "config.hash": cfg.hash(), "base_model": cfg.model.base_model,
                "base_model.revision": cfg.model.revision or "", "flyte.execution_id": execution_id(),
                "adapter_run_id": trained.mlflow_run_id,
                **{f"metric.{k}": v for k, v in results["merged"].items()}}
        version, created = registry.register_once(client, name, merged.sha256,
                                                  f"runs:/{pipeline_run_id}/merged_model", pipeline_run_id, tags)
    if created:
        decision = registry.promote(client, name, version, results["merged"], results["base"],
                                    cfg.eval.gate_metric, cfg.registry.promotion_margin, deployed.passed)
    else:
        decision = {"promoted": False, "reason": "unchanged: already registered"}
        print_line("register", f"the same merged model as version {version}: nothing new to register")
    if decision["promoted"]:
        decision["manifests"] = str(render_champion_manifests(cfg, client, version))
    tracker.set_tags({**{f"stage.{k}": v for k, v in stages.items()}, "registry.version": version,
                      "registry.promoted": decision["promoted"], "registry.reason": decision["reason"]})
    tracker.close()
    check = merged.check
    summary = {"mlflow_run_id": pipeline_run_id, "flyte_execution_id": execution_id(), "data": reports["data"],
               "tokenize": reports["tokenize"]["splits"], "train": train, "eval": results, "stages": stages,
               "merged_dir": merged_dir.path, "merged_bytes": merged.bytes,
               "merge_check": {"worst_ulps": check.worst_ulps, "mean_kl": check.mean_kl, "kl_bound": check.kl_bound,
                               "greedy_agreement": check.greedy_agreement},
               "registry": {"model": name, "version": version, **decision},
               "deploy": {"passed": deployed.passed, "skipped": deployed.skipped, "hf_agreement": deployed.hf_agreement,
                          "vllm_exact_match": _served_exact_match(merged, deployed),
                          "pid": deployed.pid, "port": deployed.port,
                          "example": _example(merged, deployed), "latency": deployed.latency or None}}
    summary["summary_file"] = str(write_summary(Path(cfg.output_dir) / cfg.name, pipeline_run_id, summary))
    return format_summary(summary)


def _serving_lines(dep: dict) -> list[str]:
    if dep.get("skipped"):
        return [f"vLLM      skipped ({dep['skipped']}): not served, so not promoted"]
    return [f"vLLM      smoke {'passed' if dep['passed'] else 'FAILED'}  greedy answers identical to HF generate: "
            f"{dep['hf_agreement']}  exact match of served answers: {dep['vllm_exact_match']}",
            f"          Q: {dep['example'].get('question')}",
            f"          A: {dep['example'].get('vllm_answer')}"]


def write_summary(out: Path, pipeline_run_id: str, summary: dict) -> Path:
    """``out/runs/<run>/summary.json`` for this execution, then ``out/summary.json`` (the latest), both atomic."""
    own = out / "runs" / pipeline_run_id / "summary.json"
    text = json.dumps({**summary, "summary_file": str(own)}, indent=1, default=str)
    for path in (own, out / "summary.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # readers see one execution's whole summary or another's, never a mix
    return own


def render_champion_manifests(cfg, client, version: str) -> Path:  # noqa: ANN001
    """A new champion gets its serving manifests (rolling update); earlier versions' folders stay for rollback.

    ``current`` moves only to the version holding the alias when the lock is taken: of two executions
    promoting at once, the one the alias left behind writes its folder but cannot point at it.
    """
    from qloraflow.deploy import manifests_lock, render_manifests, validate_manifests, write_manifests

    root = Path(cfg.output_dir) / cfg.name / "deploy"
    for target in ("k8s", "kserve"):
        manifests = render_manifests(f"models:/{cfg.registry.model_name}@champion", cfg.registry.model_name, version,
                                     target=target, max_model_len=cfg.serve.max_model_len,
                                     tracking_uri=cfg.tracking.tracking_uri)
        validate_manifests(manifests)
        with manifests_lock(root / target):
            holder = registry.champion(client, cfg.registry.model_name)
            write_manifests(root / target, manifests, version,
                            make_current=holder is not None and str(holder.version) == str(version))
    return root


def stage_provenance(client, pipeline_run_id: str, reports: dict) -> dict[str, str]:  # noqa: ANN001
    """For each stage: 'ran' in this execution, 'cached' with the pipeline run that computed it, or 'skipped'."""
    out = {}
    for stage, report in reports.items():
        run_id = report.get("mlflow_run_id")
        if report.get("skipped"):  # switched off in the config (serve.enabled: false): nothing ran, nothing cached
            out[stage] = "skipped"
            continue
        if not run_id:
            out[stage] = "ran"
            continue
        try:
            parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        except Exception:  # noqa: BLE001 - the run was deleted: the output still came from the cache
            parent = None
        out[stage] = "ran" if parent == pipeline_run_id else f"cached (computed by pipeline run {str(parent)[:8]})"
    return out


def _served_exact_match(merged: MergeResult, deployed: DeployResult) -> float | None:
    """Share of the server's chat answers that equal the held-out reference answers."""
    from qloraflow.evaluate import exact_match

    answers, refs = deployed.chat_answers, [s.reference for s in merged.samples]
    return sum(exact_match(a, r) for a, r in zip(answers, refs)) / len(answers) if answers else None


def _example(merged: MergeResult, deployed: DeployResult) -> dict:
    if not deployed.chat_answers:
        return {}
    s = merged.samples[0]
    return {"question": s.messages[-1]["content"], "reference": s.reference, "vllm_answer": deployed.chat_answers[0]}


# What each evaluation row measures: the gate compares ``merged``, the model that is served.
ROWS = {"base": "16-bit base model", "candidate": "16-bit base + adapter, unmerged",
        "merged": "adapter merged into the 16-bit base: what vLLM serves", "champion": "the registry's champion"}


def format_summary(s: dict) -> str:
    d, t, e = s["data"], s["train"], s["eval"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(d.get("rejected_by_reason", {}).items()))
    keys = sorted({k for m in e.values() for k in m if k in ("exact_match", "execution_accuracy", "eos_rate",
                                                                 "heldout_loss", "heldout_perplexity")})
    lines = ["", "=" * 72, "qloraflow pipeline summary", "=" * 72,
             f"data      read {d.get('read')}  kept {d.get('kept')}  rejected {d.get('rejected')}  ({reasons})",
             "stages    " + "  ".join(f"{k}: {v.split(' (')[0]}" for k, v in s["stages"].items()),
             f"tokens    " + "  ".join(f"{k}: {v.get('tokens')} ({v.get('trained_tokens')} trained)"
                                       for k, v in s["tokenize"].items()),
             f"train     {t.get('global_step')} steps  loss {t.get('train_loss_first'):.3f} -> "
             f"{t.get('train_loss_last'):.3f}  ({t.get('train_seconds')} s, {t.get('backend')})",
             "eval       " + "".join(f"{k:>20}" for k in keys)]
    for model, what in ROWS.items():
        if e.get(model):
            lines.append(f"  {model:<9}" + "".join(f"{e[model].get(k, float('nan')):>20.4f}" for k in keys)
                         + f"   {what}")
        elif model == "champion":
            lines.append(f"  {model:<9}  (none yet)")
    r, dep = s["registry"], s["deploy"]
    m = s["merge_check"]
    lines += [f"merged    {s['merged_dir']}  ({s['merged_bytes'] / 2**20:.1f} MiB; weights within "
              f"{m['worst_ulps']:.2f} ulp of base + adapter, mean KL {m['mean_kl']:.2e} <= {m['kl_bound']:.2e}, "
              f"greedy agreement {m['greedy_agreement']:.2%})",
              f"registry  {r['model']} version {r['version']}  promoted={r['promoted']}  ({r['reason']})",
              *([f"          serving manifests for the champion: {r['manifests']}"] if r.get("manifests") else []),
              *_serving_lines(dep),
              f"mlflow    run {s['mlflow_run_id']}  (flyte execution {s['flyte_execution_id']})",
              f"summary   {s.get('summary_file')}", "=" * 72]
    return "\n".join(lines)
