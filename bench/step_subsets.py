"""Which steps of a multi-step student help: FID of the student sampled with chosen subsets of its steps.

    python bench/step_subsets.py --student bench/.ablation/dmd2@4-sim-lr5e-5/finetune/student \\
        --steps 0,2 0,1,2 0,2,3 0,1,2,3 [--seeds 2] [--name NAME]

Each --steps entry lists indices into the student's conditioning noise levels (0 = the first, sigma_max).
`evaluate` scores only the student's own schedule and its evenly spaced subsets; this scores any subset
(each step re-noises the previous estimate to the next level, as `student_sample` does),
with evaluate's data, featurizer and noise streams (seed 0: the trajectories' noise), so the student's
full schedule reproduces evaluate's FIDs. Needs this workspace's
prepare/ and trajectories/. Writes bench/results/<NAME>.{json,md} (default: step_subsets).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fewstep import runtime
from fewstep.data import load_prepared
from fewstep.io import load_trajectories
from fewstep.metrics import Evaluator
from fewstep.models import Featurizer, load_model
from fewstep.params import load
from fewstep.sampling import student_sample

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def fid_with(student, evaluator, noise, labels, sigmas, seed, index, batch_size) -> float:
    gen = runtime.seeded(seed, f"evaluate/student/{index}")  # evaluate's re-noising stream for this seed
    images = torch.cat([student_sample(student, n, y, sigmas, gen) for n, y in zip(noise.split(batch_size), labels.split(batch_size))])
    return evaluator.fid_of(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--steps", nargs="+", required=True, help="comma-separated step indices, one subset per entry")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--name", default="step_subsets")
    args = ap.parse_args()

    params = load(ROOT / "params.yaml")
    seed, batch_size = params.seed, params.evaluate.batch_size
    _, data = load_prepared(ROOT / "prepare", splits=("train", "test"))
    evaluator = Evaluator(Featurizer.load(ROOT / "prepare" / "featurizer"), data["test_images"])
    student, info = load_model(args.student)
    traj = load_trajectories(ROOT / "trajectories")
    noises = [traj["noise"]] + [torch.randn(traj["noise"].shape, generator=runtime.seeded(seed, f"evaluate/{i}"))
                                for i in range(1, args.seeds)]
    rows = []
    for spec in args.steps:
        steps = [int(k) for k in spec.split(",")]
        if not steps or any(not 0 <= k < len(info["student_sigmas"]) for k in steps) or steps != sorted(set(steps)):
            raise SystemExit(f"--steps {spec}: expected increasing indices in 0..{len(info['student_sigmas']) - 1}")
        sigmas = [info["student_sigmas"][k] for k in steps]
        fids = [fid_with(student, evaluator, noise, traj["labels"], sigmas, seed, i, batch_size) for i, noise in enumerate(noises)]
        rows.append({"steps": steps, "sigmas": sigmas, "fid": sum(fids) / len(fids), "fid_per_seed": fids})
        print(f"[step_subsets] {spec}: FID {rows[-1]['fid']:.3f} ({' / '.join(f'{f:.3f}' for f in fids)})", flush=True)

    command = "python bench/step_subsets.py --student " + str(args.student) + " --steps " + " ".join(args.steps)
    out = ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "student": str(args.student),
                                                        "student_sigmas": info["student_sigmas"], "rows": rows}, indent=1))
    lines = [f"Made by `{command}` (--seeds {args.seeds}); the student's own noise levels: "
             f"{[round(s, 4) for s in info['student_sigmas']]}.", "",
             "| steps | noise levels | FID (mean) | per seed |", "|---|---|---|---|"]
    lines += [f"| {','.join(map(str, r['steps']))} | {', '.join(f'{s:.3g}' for s in r['sigmas'])} | {r['fid']:.3f} | "
              f"{' / '.join(f'{f:.3f}' for f in r['fid_per_seed'])} |" for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
