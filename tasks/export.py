"""Export task: GGUF files (and Ollama Modelfiles) of the merged model, each checked under llama.cpp.

Switched on by ``export.gguf`` in the config (empty by default: the task returns at once, skipped).
The files and the check's report are logged to the stage's MLflow run under ``export/``; the register
task tags the registered version with where they are (``export.artifacts``) and each type's agreement.
"""

from __future__ import annotations

import html
import typing

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow.export import export_gguf
from qloraflow.files import sha256_file
from qloraflow.reports import page_html, table_html
from qloraflow.stages import ExportResult, ExportSettings, MergeResult, RunContext
from tasks import policy
from tasks.common import local_folder, print_line, show_deck, stage_run, work_dir

ExportOutput = typing.NamedTuple("ExportOutput", [("export_dir", FlyteDirectory), ("result", ExportResult)])


def _page(report: dict) -> str:
    rows = [{"type": t, "file": r["file"], "MiB": round(r["bytes"] / 2**20, 2), "agreement": f"{r['agreement']:.1%}",
             "threshold": f"{r['min_agreement']:.0%}", "stopped": f"{r['stopped']}/{r['prompts']}",
             "stop token": r["eos_token"], "convert s": r["convert_seconds"], "llama.cpp s": r["llama_cpp_seconds"]}
            for t, r in report["gguf"].items()]
    diverged = [{"type": t, **{k: p.get(k) for k in ("prompt", "first_divergence", "merged_token", "export_token")}}
                for t, r in report["gguf"].items() for p in r["per_prompt"] if not p["same"]]
    return (f"<h3>Export</h3><p>{report['prompts']} held-out prompts, greedy, up to {report['max_new_tokens']} "
            f"tokens; the merged model stopped on {report['reference_stopped']}. Ollama TEMPLATE: "
            f"{html.escape(report['ollama_template'])}.</p>{table_html(rows)}"
            + (f"<h4>First divergences</h4>{table_html(diverged)}" if diverged else ""))


@task(cache=policy.cache("export"), container_image=policy.TRAIN_IMAGE, requests=policy.EXPORT_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def export_model(settings: ExportSettings, merged_dir: FlyteDirectory, merged: MergeResult,
                 context: RunContext) -> ExportOutput:
    """Convert, quantize and check each GGUF type; fail with every reason if an export differs from the model."""
    out = work_dir("export") / "export"
    out.mkdir(parents=True, exist_ok=True)
    if not settings.enabled:
        page = "<h3>Export</h3><p>skipped: export.gguf is empty and export.mlx is false</p>"
        return ExportOutput(export_dir=FlyteDirectory(str(out)), result=ExportResult(
            skipped="export.gguf is empty and export.mlx is false", report_html=page_html("export", page)))
    cfg = settings.export
    # Held-out prompts: the merged model's own test records, in id order (the prompt turns only).
    conversations = [[m for m in s.messages if m.get("role") != "assistant"]
                     for _, s in sorted(merged.samples.items())][: cfg.probe_samples]
    with stage_run(context, "export") as tracker:
        report = export_gguf(local_folder(merged_dir), out, cfg.gguf, conversations, python=cfg.python,
                             max_new_tokens=cfg.max_new_tokens, min_agreement=cfg.min_agreement,
                             mlx_python=cfg.mlx_python if cfg.mlx else None, mlx_quantize=cfg.mlx_quantize)
        tracker.log_metrics({f"export.{t}.agreement": r["agreement"] for t, r in report["gguf"].items()})
        tracker.log_metrics({f"export.{t}.mib": r["bytes"] / 2**20 for t, r in report["gguf"].items()})
        tracker.log_artifact(out, "export")
    page = _page(report)
    show_deck({"export": page})
    for t, r in report["gguf"].items():
        print_line("export", f"{r['file']} ({r['bytes'] / 2**20:.1f} MiB): greedy agreement {r['agreement']:.1%} "
                             f"(>= {r['min_agreement']:.0%}), {r['stopped']}/{r['prompts']} answers end at "
                             f"{r['eos_token']!r}; ollama create NAME -f {r['modelfile']}")
    agreement = {t: float(r["agreement"]) for t, r in report["gguf"].items()}
    if report.get("mlx"):
        agreement["mlx"] = float(report["mlx"]["agreement"])
        print_line("export", f"mlx/ ({report['mlx']['bytes'] / 2**20:.1f} MiB) loads and answers under mlx-lm; "
                             f"greedy agreement {report['mlx']['agreement']:.1%}")
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return ExportOutput(export_dir=FlyteDirectory(str(out)), result=ExportResult(
        gguf=agreement, files=files,
        mlflow_run_id=tracker.run_id, report_html=page_html("export", page)))
