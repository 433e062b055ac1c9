"""The EDM family's evaluation for stages/evaluate.py (`--family fewstep/families/edm/edm_evaluation.py`): teacher and student
scored against the held-out real split — FID and KID with 95% intervals over sampling seeds, FID-T (against
the teacher's own samples), precision/recall, conditioning accuracy (featurizer), a pixel-intensity view —
plus an honest floor. The stage adds NFE, per-image latency and the speedup, and draws the grids."""
from __future__ import annotations

import time

import torch

from fewstep.core import runtime
from fewstep.data.sources import load_prepared
from fewstep.core.distances import fid, kid, pixel_view
from fewstep.core.evaluation import Evaluation, Model, student_sampler
from fewstep.io import load_trajectories
from fewstep.core.metrics import Evaluator, fid_kid, over_seeds
from fewstep.data.featurizer import Featurizer
from fewstep.families.edm.unet import load_model
from fewstep.core.sampling import heun_sample, student_sigmas_for

INPUTS = {"prepare": "the prepare stage's output (held-out images, featurizer)",
          "teacher": "the teacher stage's model directory"}
launch = runtime.run  # start-up: params of the edm family, in the project root


def student_step_counts(num_steps: int) -> list[int]:
    """A k-step student is also scored with each smaller step count that divides k (subsets of its sigmas)."""
    return [k for k in (1, 2, 4, 8) if k <= num_steps and num_steps % k == 0]


def mean_over_seeds(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    fids = torch.tensor([r["fid"] for r in runs], dtype=torch.float64)
    out["fid_std"] = float(fids.std()) if len(runs) > 1 else 0.0
    out["fid_per_seed"] = [r["fid"] for r in runs]
    return out


def honest_floor(real: torch.Tensor, teacher: torch.Tensor, splits: int, seed: int) -> dict:
    """The floor scored the way models are, on data the featurizer never trained on: one half of the held-out
    images against the other half, next to as many of the teacher's samples against the same half, over
    `splits` random halvings (mean, and the 2.5-97.5 percentiles over the halvings). FID's bias grows as the
    count falls, so only these two numbers compare with each other, not with the rows above."""
    generator = runtime.seeded(seed, "evaluate/floor")
    floor, teacher_fids = [], []
    for _ in range(splits):
        order = torch.randperm(len(real), generator=generator)
        half, reference = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
        floor.append(fid(reference, half))
        teacher_fids.append(fid(reference, teacher[torch.randperm(len(teacher), generator=generator)[: len(half)]]))

    def summary(values):
        v = torch.tensor(values, dtype=torch.float64)
        return {"fid": float(v.mean()), "fid_range95": v.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()}

    return {**summary(floor), "teacher": summary(teacher_fids), "teacher_wins": sum(t < f for t, f in zip(teacher_fids, floor)),
            "splits": splits, "num_images": len(real) // 2, "num_reference": len(real) - len(real) // 2}


def evaluation(params, args, device) -> Evaluation:
    """The teacher (its trajectories' Heun steps, and 1 NFE), the student at its own steps and at every step
    count that divides them, on the trajectories' one split (classes are not held out: the teacher's samples
    of every class), over evaluate.seeds sampling seeds."""
    p = params.evaluate
    _, data = load_prepared(args.prepare, splits=("test",))
    evaluator = Evaluator(Featurizer.load(args.prepare / "featurizer"), data["test_images"], k=p.knn_k)
    teacher, _ = load_model(args.teacher, device)
    student, student_info = load_model(args.student, device)
    traj = load_trajectories(args.trajectories)
    labels, steps = traj["cond_index"], traj["index"]["sampling_steps"]
    num_steps = len(student_info["student_sigmas"])

    models = {"teacher": Model(traj["index"]["nfe"], lambda i: (lambda n, y: heun_sample(teacher, n, y, steps))),
              "teacher_1nfe": Model(1, lambda i: (lambda n, y: heun_sample(teacher, n, y, 1)))}
    for k in student_step_counts(num_steps):
        sigmas = student_sigmas_for(student_info, k)
        models[f"student@{k}"] = Model(k, lambda i, sigmas=sigmas: student_sampler(student, sigmas, params.seed, i))

    def score(samples: dict[str, list[torch.Tensor]], images: dict[str, list[torch.Tensor]]) -> dict:
        started = time.perf_counter()
        features = {name: [evaluator.features(x) for x in per_seed] for name, per_seed in images.items()}
        real, reference = evaluator.real_features, features["teacher"][0]  # FID-T's reference: the teacher, seed 0
        metrics = {}
        for name, per_seed in images.items():
            runs = [evaluator.score(x, labels, f) for x, f in zip(per_seed, features[name])]
            own = features[name][1:] if name == "teacher" else features[name]  # the teacher against its other seeds
            metrics[name] = {**mean_over_seeds(runs),
                             **over_seeds({"fid": [r["fid"] for r in runs],  # scored per seed above
                                           "kid": [kid(real, f) for f in features[name]]}),
                             **(over_seeds(fid_kid([(reference, f) for f in own]), "_t") if own else {})}
        metrics["floor"] = floor = honest_floor(real, features["teacher"][0], p.floor_splits, params.seed)
        metrics.update(real_pixel_faint=pixel_view(data["test_images"], data["test_images"])["pixel_faint"],
                       student_steps=num_steps, seeds=p.seeds, num_samples=len(labels),
                       num_reference=len(data["test_images"]))
        print(f"[evaluate] metrics in {time.perf_counter() - started:.1f} s; floor: held-out half vs half FID "
              f"{floor['fid']:.3f}, the teacher at that count {floor['teacher']['fid']:.3f} ({floor['num_images']} vs "
              f"{floor['num_reference']} images, mean of {floor['splits']} halvings; the teacher lower in "
              f"{floor['teacher_wins']}); FIDs averaged over {p.seeds} sampling seeds", flush=True)
        return metrics

    return Evaluation(models=models, student=f"student@{num_steps}", noise=traj["noise"], cond=labels,
                      teacher_samples=traj["samples"], seeds=p.seeds, decode=lambda x: x,
                      score=score, grids=["teacher", *(f"student@{k}" for k in student_step_counts(num_steps))])
