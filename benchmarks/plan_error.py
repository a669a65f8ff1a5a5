"""The plan's predictions (qloraflow/plan.py) against measured runs (benchmarks/plan_calibration.json).

    python benchmarks/plan_error.py            # predicted vs measured, error per run, with plan.py's constants
    python benchmarks/plan_error.py --fit      # refit the free constants on the runs, print them and the error
    python benchmarks/plan_error.py --loo      # each run predicted by constants fitted on the other runs
    python benchmarks/plan_error.py --json out.json

Each run in the calibration file is a config plus overrides (``set``) and a model shape; the script builds
the run's :class:`qloraflow.plan.Workload` from them exactly as ``qloraflow plan`` does from a config, so
a new measured run is one more object in that file. ``--fit`` minimises the squared log errors of peak
memory and tokens/s over every run (scipy's least_squares); paste what it prints into ``CONSTANTS``.
Targets: peak memory within 10%, tokens/s within 25%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qloraflow.config import load_config  # noqa: E402
from qloraflow.plan import CONSTANTS, GPUS, ModelShape, memory_gib, step_seconds, workload  # noqa: E402

CALIBRATION = ROOT / "benchmarks" / "plan_calibration.json"
MEMORY_KEYS = ("overhead_gib", "working_sets.hf", "working_sets.unsloth")
SPEED_KEYS = ("matmul_eff.hf", "matmul_eff.unsloth", "attn_eff.masked", "attn_eff.flash", "micro_s.hf",
              "micro_s.unsloth")
# Physical ranges: efficiencies are shares of the peak, fixed times and overheads not negative.
BOUNDS = {"matmul_eff": (0.05, 0.95), "attn_eff": (0.05, 0.95), "micro_s": (0.0, 0.5),
          "working_sets": (0.3, 3.0), "overhead_gib": (0.0, 3.0)}
TARGETS = {"memory": 0.10, "tokens_per_s": 0.25}


def load_runs(path: Path = CALIBRATION) -> list[dict[str, Any]]:
    """Each run with its shape and workload resolved."""
    data = json.loads(path.read_text())
    runs = []
    for row in data["rows"]:
        cfg = load_config(ROOT / row["config"], dict(row.get("set", {})))
        runs.append({**row, "model": ModelShape.from_config(data["shapes"][row["shape"]]),
                     "work": workload(cfg, row.get("example_tokens"))})
    return runs


def predict(run: dict[str, Any], k: dict[str, float]) -> tuple[float, float]:
    """(peak reserved GiB, tokens/s) the plan predicts for one run."""
    mem = memory_gib(run["model"], run["work"], k)["reserved"]
    step = step_seconds(run["model"], run["work"], GPUS[run["gpu"]], k)["total"]
    return mem, run["work"].tokens / step


def errors(runs: list[dict[str, Any]], k: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        mem, tps = predict(r, k)
        m, t = r.get("peak_reserved_gib"), r.get("tokens_per_s")
        out.append({"id": r["id"], "gpu": r["gpu"], "seq_x_mb": f"{r['work'].seq}x{r['work'].micro_batch}",
                    "backend": r["work"].backend, "statistic": r.get("statistic"),
                    "memory_measured": m, "memory_predicted": round(mem, 2),
                    "memory_error": None if m is None else round(mem / m - 1, 4),
                    "tps_measured": t, "tps_predicted": round(tps),
                    "tps_error": None if t is None else round(tps / t - 1, 4)})
    return out


def leave_one_out(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's errors under constants fitted without it: the error on a run the fit has not seen."""
    return [errors([r], fit(runs[:i] + runs[i + 1:]))[0] for i, r in enumerate(runs)]


def fit(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Constants minimising the squared log errors (memory and speed fitted apart: they share none)."""
    import numpy as np
    from scipy.optimize import least_squares

    def solve(keys: tuple[str, ...], which: int, measured: str) -> dict[str, float]:
        rows = [r for r in runs if r.get(measured) is not None]

        def residuals(x: np.ndarray) -> np.ndarray:
            k = {**CONSTANTS, **dict(zip(keys, x))}
            return np.array([math.log(predict(r, k)[which] / r[measured]) for r in rows])

        x0 = np.array([CONSTANTS[key] for key in keys])
        lo, hi = zip(*(BOUNDS[key.split(".")[0]] for key in keys))
        sol = least_squares(residuals, np.clip(x0, lo, hi), bounds=(lo, hi))
        return dict(zip(keys, (round(float(v), 4) for v in sol.x)))

    return {**CONSTANTS, **solve(MEMORY_KEYS, 0, "peak_reserved_gib"), **solve(SPEED_KEYS, 1, "tokens_per_s")}


def report(rows: list[dict[str, Any]]) -> str:
    head = f"{'run':<24} {'gpu':<5} {'seq x mb':<9} {'backend':<8} {'GiB meas':>8} {'pred':>6} {'err':>7}  " \
           f"{'tok/s meas':>10} {'pred':>6} {'err':>7}  statistic"
    lines = [head, "-" * len(head)]
    for r in rows:
        me = "-" if r["memory_error"] is None else f"{r['memory_error']:+.1%}"
        te = "-" if r["tps_error"] is None else f"{r['tps_error']:+.1%}"
        lines.append(f"{r['id']:<24} {r['gpu']:<5} {r['seq_x_mb']:<9} {r['backend']:<8} "
                     f"{r['memory_measured'] or '-':>8} {r['memory_predicted']:>6.2f} {me:>7}  "
                     f"{r['tps_measured'] or '-':>10} {r['tps_predicted']:>6} {te:>7}  {r['statistic']}")
    for key, name in (("memory_error", "memory"), ("tps_error", "tokens_per_s")):
        errs = [abs(r[key]) for r in rows if r[key] is not None]
        within = sum(e <= TARGETS[name] for e in errs)
        lines.append(f"{name}: {len(errs)} runs, mean |error| {sum(errs) / len(errs):.1%}, max {max(errs):.1%}, "
                     f"{within}/{len(errs)} within {TARGETS[name]:.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", default=str(CALIBRATION), help="runs file (default: %(default)s)")
    ap.add_argument("--fit", action="store_true", help="refit the free constants and print them")
    ap.add_argument("--loo", action="store_true", help="leave-one-out: each run against a fit on the others")
    ap.add_argument("--json", help="write the per-run errors (and constants) here")
    args = ap.parse_args(argv)
    runs = load_runs(Path(args.calibration))
    k = fit(runs) if args.fit else dict(CONSTANTS)
    if args.fit:
        print("CONSTANTS = " + json.dumps(k, indent=1))
    rows = leave_one_out(runs) if args.loo else errors(runs, k)
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"constants": k, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
