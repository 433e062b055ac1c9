"""Which steps of a multi-step student help: FID of the student sampled with chosen subsets of its steps.

    python bench/step_subsets.py --student bench/.ablation/dmd2@4-sim-lr5e-5/finetune/student \\
        --steps 0,2 0,1,2 0,2,3 0,1,2,3 [--seeds 2] [--name NAME]

Each --steps entry lists indices into the student's conditioning noise levels (0 = the first, sigma_max);
an entry `t<sigma>` (e.g. `0,1,2,t0.17`) lets the *teacher* take that step at that noise level instead, which
shows what a last re-noise-and-denoise step can give at best; the entry `teacher` is the teacher itself at its
full NFE (the trajectories' Heun steps), as a reference row. `--vs-train` adds each row's FID against the
training images: what the models were fit to, where the held-out FID also counts the train/test gap.
`evaluate` scores only the student's own schedule and its evenly spaced subsets; this scores any subset
(each step re-noises the previous estimate to the next level, as `student_sample` does),
with evaluate's data, featurizer and noise streams (seed 0: the trajectories' noise), so the student's
full schedule reproduces evaluate's FIDs (tests/test_stages.py checks it). Needs a workspace's
params.yaml, prepare/ and trajectories/ (--workspace, default: this checkout). Writes
<--results>/<NAME>.{json,md} (default: bench/results/step_subsets.{json,md}).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from fewstep.data.sources import load_prepared
from fewstep.core.evaluation import seed_noise, student_sampler
from fewstep.io import load_trajectories
from fewstep.core.metrics import Evaluator
from fewstep.data.featurizer import Featurizer
from fewstep.families.edm.unet import load_model
from fewstep.params import load
from fewstep.core.sampling import batched, heun_sample

ROOT = Path(__file__).resolve().parents[1]


class TeacherAt:
    """The student, except at the given noise levels, where the teacher denoises (one step each)."""

    def __init__(self, student, teacher, sigmas: set[float]):
        self.student, self.teacher, self.sigmas = student, teacher, sigmas

    def __call__(self, x, sigma, cond):
        return (self.teacher if sigma in self.sigmas else self.student)(x, sigma, cond)


def has_teacher_step(spec: str) -> bool:
    return spec != "teacher" and any(item.startswith("t") for item in spec.split(","))


def parse_steps(spec: str, student_sigmas: list[float]) -> tuple[list[float], set[float]]:
    """'0,2,t0.17' -> noise levels [80, 2.52, 0.17] and the teacher's {0.17}; exits with one line if malformed."""
    sigmas, teacher_sigmas = [], set()
    try:
        for item in spec.split(","):
            if item.startswith("t"):
                sigmas.append(float(item[1:]))
                teacher_sigmas.add(sigmas[-1])
            else:
                if not 0 <= int(item) < len(student_sigmas):
                    raise ValueError
                sigmas.append(student_sigmas[int(item)])
    except ValueError:
        sigmas = []
    if not sigmas or sigmas != sorted(set(sigmas), reverse=True):
        raise SystemExit(f"--steps {spec}: expected decreasing noise levels: indices in 0..{len(student_sigmas) - 1} "
                         "or t<sigma> for a teacher step")
    return sigmas, teacher_sigmas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--steps", nargs="+", required=True,
                    help="comma-separated step indices (or t<sigma> for a teacher step), one subset per entry")
    ap.add_argument("--teacher", type=Path, default=None, help="for t<sigma> steps; default: <workspace>/teacher/model")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--vs-train", action="store_true", help="also FID against the training images")
    ap.add_argument("--name", default="step_subsets")
    ap.add_argument("--workspace", type=Path, default=ROOT, help="holds params.yaml, prepare/ and trajectories/")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    params = load(args.workspace / "params.yaml")
    seed, batch_size = params.seed, params.evaluate.batch_size
    _, data = load_prepared(args.workspace / "prepare", splits=("train", "test"))
    featurizer = Featurizer.load(args.workspace / "prepare" / "featurizer")
    evaluator = Evaluator(featurizer, data["test_images"])
    train_evaluator = Evaluator(featurizer, data["train_images"]) if args.vs_train else None
    student, info = load_model(args.student)
    traj = load_trajectories(args.workspace / "trajectories")
    noises = [seed_noise(traj["noise"], seed, i) for i in range(args.seeds)]
    teacher = None

    def sampler_for(spec: str) -> tuple[list[float], Callable[[int], Callable]]:
        """An entry's noise levels (none for the full teacher) and its sampler per sampling seed."""
        nonlocal teacher
        if spec == "teacher" or has_teacher_step(spec):
            teacher = teacher or load_model(args.teacher or args.workspace / "teacher" / "model")[0]
        if spec == "teacher":
            steps = traj["index"]["sampling_steps"]
            return [], lambda i: (lambda noise, cond: heun_sample(teacher, noise, cond, steps))
        sigmas, teacher_sigmas = parse_steps(spec, info["student_sigmas"])
        model = TeacherAt(student, teacher, teacher_sigmas) if teacher_sigmas else student
        return sigmas, lambda i: student_sampler(model, sigmas, seed, i)

    rows = []
    for spec in args.steps:
        sigmas, make = sampler_for(spec)
        images = [traj["samples"] if spec == "teacher" and i == 0  # seed 0: the trajectories' own teacher images
                  else batched(make(i), noise, traj["cond_index"], batch_size, "cpu") for i, noise in enumerate(noises)]
        fids = [evaluator.fid_of(x) for x in images]
        row = {"steps": spec.split(","), "sigmas": sigmas, "fid": sum(fids) / len(fids), "fid_per_seed": fids}
        if train_evaluator:
            row["fid_vs_train"] = sum(train_evaluator.fid_of(x) for x in images) / len(images)
        rows.append(row)
        against_train = f", vs train {row['fid_vs_train']:.3f}" if train_evaluator else ""
        print(f"[step_subsets] {spec}: FID {row['fid']:.3f} ({' / '.join(f'{f:.3f}' for f in fids)}){against_train}",
              flush=True)

    nfe = traj["index"]["nfe"]
    command = ("python bench/step_subsets.py --student " + str(args.student) + " --steps " + " ".join(args.steps)
               + (" --vs-train" if args.vs_train else ""))
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "student": str(args.student),
                                                        "student_sigmas": info["student_sigmas"], "rows": rows}, indent=1))
    with_teacher_steps = any(map(has_teacher_step, args.steps))
    note = " `t<sigma>`: the teacher takes that step (one denoiser call)." if with_teacher_steps else ""
    vs_train = " FID vs train |" if train_evaluator else ""
    lines = [f"Made by `{command}` (--seeds {args.seeds}); the student's own noise levels: "
             f"{[round(s, 4) for s in info['student_sigmas']]}.{note}", "",
             f"| steps | noise levels | FID (mean) | per seed |{vs_train}",
             "|---|---|---|---|" + "---|" * bool(vs_train)]
    for r in rows:
        levels = ", ".join(f"{s:.3g}" for s in r["sigmas"]) or f"teacher, {nfe} NFE"
        lines.append(f"| {','.join(r['steps'])} | {levels} | {r['fid']:.3f} | "
                     f"{' / '.join(f'{f:.3f}' for f in r['fid_per_seed'])} |"
                     + (f" {r['fid_vs_train']:.3f} |" if train_evaluator else ""))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
