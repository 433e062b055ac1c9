"""The text-to-image families on their mini teachers: each `pipelines/<family>-digits` run end to end from a fresh
clone of the committed tree (`dvc repro`: the mini teacher trained here, then the real pipelines' stages, then the
judge through plain diffusers), timed, with its judge/metrics.json. Writes bench/results/digits_minis.{json,md}:
the issue's targets beside the measurements (teacher prompt accuracy >= 0.90; student >= teacher - 0.05; student
FID <= 1.5x the teacher's; `dvc repro` <= 15 minutes on 2 cores).

    python bench/digits_minis.py                      # sdxl, sd15, sd3 (tens of minutes on 2 cores)
    python bench/digits_minis.py --families sdxl      # one family
    python bench/digits_minis.py --keep /tmp/minis    # keep the clones (their dvc.lock and DVC cache)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAMILIES = ["sdxl", "sd15", "sd3"]


def run_family(family: str, clone: Path) -> dict:
    folder = clone / "pipelines" / f"{family}-digits"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(clone), "HOME": str(clone.parent)}
    started = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{family}-digits: dvc repro failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    judge = json.loads((folder / "judge/metrics.json").read_text())
    evaluate = json.loads((folder / "evaluate/metrics.json").read_text())
    t, s = judge["teacher"], judge["student"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    return {"family": family, "commit": commit, "repro_s": round(seconds, 1), "judge": judge,
            "evaluate_fid_t": {name: evaluate[name].get("fid_t") for name in ("teacher", "student")},
            "targets": {"teacher_accuracy_ge_0.90": t["prompt_accuracy"] >= 0.90,
                        "student_accuracy_ge_teacher_minus_0.05": s["prompt_accuracy"] >= t["prompt_accuracy"] - 0.05,
                        "student_fid_le_1.5x_teacher": s["fid"] <= 1.5 * t["fid"],
                        "repro_le_15_min": seconds <= 900}}


def interval(m: dict, key: str, digits: int = 3) -> str:
    low, high = m.get(f"{key}_ci95", [float("nan")] * 2)
    return f"{m[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(rows: list[dict]) -> str:
    lines = ["| family | model | call | prompt accuracy [95%] | FID [95%] | FID-T [95%] | latency / image | `dvc repro` |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in ("teacher", "student"):
            m = row["judge"][name]
            call = f"{m['call']['num_inference_steps']} steps, CFG {m['call']['guidance_scale']:g}"
            fid_t = interval(m, "fid_t") if "fid_t" in m else "–"
            lines.append(f"| {row['family']} | {name} | {call} | {interval(m, 'prompt_accuracy')} | {interval(m, 'fid')} | "
                         f"{fid_t} | {m['latency_ms']:.1f} ms | {row['repro_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--keep", type=Path, help="run the clones here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families:
            clone = (args.keep or Path(scratch)) / family / "fewstep"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            rows.append(run_family(family, clone))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "judge"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "digits_minis.json"
    # a run of some families replaces their rows and keeps the others'
    earlier = [r for r in (json.loads(results.read_text()) if results.exists() else []) if r["family"] not in args.families]
    rows = sorted(earlier + rows, key=lambda r: FAMILIES.index(r["family"]))
    results.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "digits_minis.md").write_text(
        "# Text-to-image minis trained on digits, judged through plain diffusers\n\n"
        "`python bench/digits_minis.py`; each row from a fresh clone's `dvc repro` on 2 CPU cores, of the commit "
        "named in digits_minis.json.\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
