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
from qloraflow.comparison import gate_html
from qloraflow.evaluate import evaluate_model
from qloraflow.mlflow_model import download_version, log_merged_model
from qloraflow.modelcard import with_results
from qloraflow.outputs import keep_execution
from qloraflow.reports import page_html
from qloraflow.stages import (DataResult, DeployResult, EvalResult, ExportResult, MergeResult, RegisterSettings,
                              RunContext, TokenizeResult, TrainResult)
from qloraflow.tracking import MlflowTracker
from tasks import policy
from tasks.common import execution_id, fail_pipeline_run, local_folder, print_line, show_deck


def _champion_side(cfg, client, data: str, tok: str, test_key: str) -> dict:  # noqa: ANN001
    """The champion's metrics and per-record verdicts (gate metric) on this test split, and where they come from.

    Stored with the version when it was evaluated on this split; otherwise (another split or
    evaluation, or a version registered before verdicts were kept) the champion is re-evaluated here,
    so that the gate can pair it with the candidate record by record.
    """
    current = registry.champion(client, cfg.registry.model_name)
    if current is None:
        return {"version": None, "metrics": {}, "verdicts": None, "source": None}
    tags, gate = current.tags or {}, cfg.eval.gate_metric
    if tags.get("eval_key") == test_key:
        verdicts = registry.stored_verdicts(client, current, gate, test_key)
        if verdicts is not None:
            return {"version": str(current.version), "verdicts": verdicts, "source": "stored with the version",
                    "metrics": {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}}
        why = "it kept no per-record verdicts"
    else:
        why = "it was evaluated on another test split or with other settings"
    evaluation = evaluate_model(cfg, str(download_version(client, current.source)), data, tok)
    print_line("register", f"champion v{current.version} re-evaluated on this test split: {why}")
    return {"version": str(current.version), "metrics": evaluation.metrics, "verdicts": evaluation.verdicts(gate),
            "source": f"re-evaluated on this test split ({why})"}


def _report(folder: str, run_id: str) -> dict:
    """A stage's whole report (``report.json`` in its output folder) with the stage's MLflow run."""
    return {**json.loads((Path(folder) / "report.json").read_text()), "mlflow_run_id": run_id}


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES, enable_deck=True)
def register_and_promote(settings: RegisterSettings, context: RunContext, data: DataResult, data_dir: FlyteDirectory,
                         tokenized: TokenizeResult, tok_dir: FlyteDirectory, trained: TrainResult,
                         evaluated: EvalResult, merged: MergeResult, merged_dir: FlyteDirectory,
                         deployed: DeployResult, exported: ExportResult) -> str:
    """Log the pipeline's results, register the merged model, gate the champion alias; return the summary.

    The pipeline's MLflow run ends here: FINISHED, or FAILED with the error when this task raises."""
    try:
        return _register_and_promote(settings, context, data, data_dir, tokenized, tok_dir, trained, evaluated,
                                     merged, merged_dir, deployed, exported)
    except BaseException as e:
        fail_pipeline_run(context, "register", f"{type(e).__name__}: {e}"[:4000])
        raise


def _register_and_promote(settings: RegisterSettings, context: RunContext, data: DataResult,
                          data_dir: FlyteDirectory, tokenized: TokenizeResult, tok_dir: FlyteDirectory,
                          trained: TrainResult, evaluated: EvalResult, merged: MergeResult,
                          merged_dir: FlyteDirectory, deployed: DeployResult,
                          exported: ExportResult) -> str:
    cfg = settings.config
    name = cfg.registry.model_name
    pipeline_run_id = context.pipeline_run_id
    data_local, tok_local = data_dir.download(), tok_dir.download()
    results = {k: dict(v) for k, v in evaluated.metrics.items()}
    # The pages go to outputs/<name>/runs/<run>/decks/, not into the summary and the MLflow report.
    pages = {stage: r.report_html for stage, r in (("data", data), ("tokenize", tokenized), ("train", trained),
                                                  ("evaluate", evaluated), ("merge", merged), ("deploy", deployed),
                                                  ("export", exported))}
    train = {k: v for k, v in dataclasses.asdict(trained).items() if k != "report_html"}
    deploy = {k: v for k, v in dataclasses.asdict(deployed).items() if (k != "skipped" or v) and k != "report_html"}
    merge = {k: v for k, v in dataclasses.asdict(merged).items() if k != "report_html"}
    export = {k: v for k, v in dataclasses.asdict(exported).items() if (k != "skipped" or v) and k != "report_html"}
    reports = {"data": _report(data_local, data.mlflow_run_id), "tokenize": _report(tok_local, tokenized.mlflow_run_id),
               "train": train, "evaluate": {"mlflow_run_id": evaluated.mlflow_run_id}, "merge": merge,
               "deploy": deploy, "export": export}
    tracker = MlflowTracker(context.experiment, context.tracking_uri, run_id=pipeline_run_id)
    client = registry.client_for(context.tracking_uri)
    stages = stage_provenance(client, pipeline_run_id, reports)
    test_key = f"{settings.eval_digest}:{settings.data_digest}"
    champ = _champion_side(cfg, client, data_local, tok_local, test_key)
    results["champion"] = champ["metrics"]
    results["merged"] = dict(merged.metrics)
    for model, metrics in results.items():
        tracker.log_metrics({f"{model}.{k}": v for k, v in metrics.items()})

    gate = cfg.eval.gate_metric
    version = registry.version_with_digest(client, name, merged.sha256)
    created, uploaded = False, version is None
    if uploaded:  # upload outside the registry lock; register_once re-checks under it
        # One dataset hash everywhere: the content digest of the input files, as on the pipeline and data runs.
        tags = {"train_key": settings.train_digest, "data_key": settings.data_digest, "eval_key": test_key,
                "dataset.hash": settings.dataset_hash, "config.hash": cfg.hash(), "base_model": cfg.model.base_model,
                "base_model.revision": cfg.model.revision or "", "flyte.execution_id": execution_id(),
                "adapter_run_id": trained.mlflow_run_id, registry.VERDICTS_TAG: f"runs:/{pipeline_run_id}/gate/verdicts.json",
                **{f"metric.{k}": v for k, v in results["merged"].items()}}
        # An MLflow Model (transformers flavor, chat signature) logged into the pipeline run; the version is it.
        card = (f"# {name}\n\n{cfg.model.base_model} with the LoRA adapter of MLflow run {trained.mlflow_run_id} "
                f"merged in (16-bit). Dataset hash: `{settings.dataset_hash}`.\n\n"
                + with_results("", results, gate))
        model_id, model_uri = log_merged_model(client, pipeline_run_id, local_folder(merged_dir), card,
                                               tags={"dataset.hash": settings.dataset_hash, registry.DIGEST_TAG: merged.sha256})
        # The per-record verdicts: what the next candidate is paired with while this version is champion.
        tracker.log_dict(registry.verdicts_document(merged.samples, test_key), "gate/verdicts.json")
        version, created = registry.register_once(client, name, merged.sha256, model_uri, pipeline_run_id, tags,
                                                  model_id=model_id)
    if not exported.skipped:  # the version points at its checked exports (GGUF files and Modelfiles)
        for key, value in export_tags(exported).items():
            client.set_model_version_tag(name, version, key, value)
    if created:
        decision = registry.promote(
            client, name, version, results["merged"], results["base"], gate, cfg.registry.promotion_margin,
            deployed.passed, verdicts={rid: s.scores[gate] for rid, s in merged.samples.items()},
            base_verdicts={rid: s.scores[gate] for rid, s in evaluated.samples["base"].items()},
            champion_verdicts=lambda mv: champ["verdicts"] if str(mv.version) == champ["version"]
            else registry.stored_verdicts(client, mv, gate, test_key),
            confidence=cfg.registry.confidence, seed=cfg.seed)
        if "champion" in decision["tests"] and champ["source"]:
            decision["tests"]["champion"]["verdicts_from"] = champ["source"]
        for key, value in registry.decision_tags(decision).items():
            client.set_model_version_tag(name, version, key, value)
    else:
        decision = {"promoted": False, "reason": "unchanged: already registered", "tests": {}}
        print_line("register", f"the same merged model as version {version}: nothing new to register")
    if uploaded:
        tracker.log_dict({"data": reports["data"], "tokenize": reports["tokenize"], "train": train,
                          "eval": {**results, "gate": decision}, "deploy": deploy, "export": export,
                          "merge": {k: v for k, v in merge.items() if k != "samples"}}, "pipeline_report.json")
    root = Path(cfg.output_dir) / cfg.name
    if decision["promoted"]:
        decision["manifests"] = str(render_champion_manifests(cfg, client, version).relative_to(root))
    # What a user keeps, under outputs/<name>/runs/<run>/: the model outlives Flyte's sandbox folders.
    source = merged_dir.remote_source or merged_dir.path
    samples = {**{m: [dataclasses.asdict(s) for s in ss.values()] for m, ss in evaluated.samples.items()},
               "merged": [dataclasses.asdict(s) for s in merged.samples.values()]}
    # The decision on the evaluation page (kept, and this task's Deck) beside the metrics it was taken on.
    gate_section = gate_html(decision, gate)
    pages["register"] = page_html("register", gate_section)
    show_deck({"promotion gate": gate_section})
    kept = keep_execution(root, pipeline_run_id, source if "://" in source or os.path.isdir(source) else None,
                          pages, results, samples, gate_section=gate_section)
    tracker.log_artifact(root / kept["comparison_png"], "evaluate")
    tracker.log_table(json.loads((root / kept["eval_samples"]).read_text()), "eval_samples.json")  # sortable
    tracker.set_tags({**{f"stage.{k}": v for k, v in stages.items()}, "registry.version": version,
                      "registry.promoted": decision["promoted"], "registry.reason": decision["reason"],
                      **registry.decision_tags(decision)})
    tracker.log_metrics({f"gate.vs_{side}.{k}": t[k] for side, t in decision["tests"].items()
                         for k in ("difference", "lower", "upper", "p_value", "n") if t.get(k) is not None})
    tracker.close()
    check = merged.check
    summary = {"mlflow_run_id": pipeline_run_id, "flyte_execution_id": execution_id(), "data": reports["data"],
               "tokenize": reports["tokenize"]["splits"], "train": train, "eval": results, "stages": stages,
               "merged_dir": kept.get("merged_model") or kept.get("merged_model_uri"), "merged_bytes": merged.bytes,
               "outputs": {k: v for k, v in kept.items() if k not in ("merged_model", "merged_model_uri")},
               "merge_check": {"worst_ulps": check.worst_ulps, "mean_kl": check.mean_kl, "kl_bound": check.kl_bound,
                               "greedy_agreement": check.greedy_agreement},
               "registry": {"model": name, "version": version, **decision},
               "export": {"skipped": exported.skipped, "gguf": exported.gguf, "artifacts": export_tags(exported).get(
                   "export.artifacts") if not exported.skipped else None},
               "deploy": {"passed": deployed.passed, "skipped": deployed.skipped, "hf_agreement": deployed.hf_agreement,
                          "vllm_exact_match": _served_exact_match(merged, deployed),
                          "port": deployed.port,  # the server is stopped: no pid to look up
                          "example": _example(merged, deployed), "latency": deployed.latency or None}}
    summary["summary_file"] = str(write_summary(root, pipeline_run_id, summary).relative_to(root))
    return format_summary(summary, root)



def export_tags(exported: ExportResult) -> dict[str, str]:
    """Registered-version tags of the checked exports: where the files are, and each GGUF type's agreement."""
    return {"export.artifacts": f"runs:/{exported.mlflow_run_id}/export",
            **{f"export.{t}.agreement": f"{a:.4f}" for t, a in exported.gguf.items()},
            **{f"export.sha256.{f}": h for f, h in exported.files.items() if f.endswith(".gguf")}}


def _gate_lines(tests: dict) -> list[str]:
    """One line per side of the gate: the difference, its interval, p-value and n, or why only point estimates."""
    lines = []
    for side, t in tests.items():
        if t.get("lower") is not None:
            text = (f"{t['difference']:+.4f}  [{t['lower']:+.4f}, {t['upper']:+.4f}] at {t['confidence']:.0%}  "
                    f"p={t['p_value']:.3g}  n={t['n']}  {t['method']}")
        else:
            text = t["source"]
        where = f"; verdicts {t['verdicts_from']}" if t.get("verdicts_from") else ""
        lines.append(f"gate      vs {side:<9} {text}  {'passed' if t['passed'] else 'NOT passed'}{where}")
    return lines


def _serving_lines(dep: dict) -> list[str]:
    if dep.get("skipped"):
        return [f"vLLM      skipped ({dep['skipped']}): not served, so not promoted"]
    return [f"vLLM      smoke {'passed' if dep['passed'] else 'FAILED'}  greedy answers identical to HF generate: "
            f"{dep['hf_agreement']}  exact match of served answers: {dep['vllm_exact_match']}",
            f"          Q: {dep['example'].get('question')}",
            f"          A: {dep['example'].get('vllm_answer')}"]


def write_summary(out: Path, pipeline_run_id: str, summary: dict) -> Path:
    """``out/runs/<run>/summary.json`` for this execution, then ``out/summary.json`` (the latest), both atomic.

    Paths in both are relative to ``out`` (``outputs/<name>``).
    """
    own = out / "runs" / pipeline_run_id / "summary.json"
    text = json.dumps({**summary, "summary_file": str(own.relative_to(out))}, indent=1, default=str)
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
                                     target=target, max_model_len=cfg.serve.max_model_len)
        validate_manifests(manifests)
        with manifests_lock(root / target):
            holder = registry.champion(client, cfg.registry.model_name)
            write_manifests(root / target, manifests, version,
                            make_current=holder is not None and str(holder.version) == str(version))
    return root


def stage_provenance(client, pipeline_run_id: str, reports: dict) -> dict[str, str]:  # noqa: ANN001
    """For each stage: 'ran' in this execution, 'cached' with the pipeline run that computed it, or 'skipped'.

    A sweep's trial (``workflows/sweep.py``) shares the data and tokenize stages, whose runs nest under
    the sweep's run: those count as this execution's too.
    """
    own = {pipeline_run_id}
    try:
        sweep = client.get_run(pipeline_run_id).data.tags.get("qloraflow.sweep")
    except Exception:  # noqa: BLE001 - a deleted run
        sweep = None
    if sweep:
        own.add(sweep)
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
        out[stage] = "ran" if parent in own else f"cached (computed by pipeline run {str(parent)[:8]})"
    return out


def _served_exact_match(merged: MergeResult, deployed: DeployResult) -> float | None:
    """Share of the server's chat answers that equal their records' reference answers (matched by record id)."""
    from qloraflow.evaluate import exact_match
    from qloraflow.paired import match_ids

    answers = deployed.chat_answers
    if not answers:
        return None
    ids = match_ids(answers, merged.samples, "the served answers", "the merged model's samples")
    return sum(exact_match(answers[i], merged.samples[i].reference) for i in ids) / len(ids)


def _example(merged: MergeResult, deployed: DeployResult) -> dict:
    if not deployed.chat_answers:
        return {}
    rid, answer = next(iter(deployed.chat_answers.items()))
    s = merged.samples[rid]
    return {"id": rid, "question": s.messages[-1]["content"], "reference": s.reference, "vllm_answer": answer}


# What each evaluation row measures: the gate compares ``merged``, the model that is served.
ROWS = {"base": "16-bit base model", "candidate": "16-bit base + adapter, unmerged",
        "merged": "adapter merged into the 16-bit base: what vLLM serves", "champion": "the registry's champion"}


def format_summary(s: dict, root: Path = Path(".")) -> str:
    """The summary as the pipeline prints it; paths are shown joined to ``root`` (``outputs/<name>``)."""
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
    kept = s.get("outputs", {})
    here = lambda p: str(p) if p is None or "://" in str(p) else str(root / p)  # noqa: E731
    lines += [f"merged    {here(s['merged_dir'])}  ({s['merged_bytes'] / 2**20:.1f} MiB; weights within "
              f"{m['worst_ulps']:.2f} ulp of base + adapter, mean KL {m['mean_kl']:.2e} <= {m['kl_bound']:.2e}, "
              f"greedy agreement {m['greedy_agreement']:.2%})",
              f"registry  {r['model']} version {r['version']}  promoted={r['promoted']}  ({r['reason']})",
              *_gate_lines(r.get("tests") or {}),
              *([f"          serving manifests for the champion: {here(r['manifests'])}"] if r.get("manifests") else []),
              *_serving_lines(dep),
              *([f"export    GGUF " + "  ".join(f"{t}: agreement {a:.1%}" for t, a in s["export"]["gguf"].items())]
                if (s.get("export") or {}).get("gguf") else []),
              *([f"plots     {here(kept['comparison_png'])}  samples {here(kept['eval_samples'])}"]
                if kept.get("comparison_png") else []),
              *[f"{'decks' if i == 0 else '':<10}{stage + ':':<10}{here(page)}"
                for i, (stage, page) in enumerate(kept.get("decks", {}).items())],
              f"mlflow    run {s['mlflow_run_id']}  (flyte execution {s['flyte_execution_id']})",
              f"summary   {here(s.get('summary_file'))}", "=" * 72]
    return "\n".join(lines)
