"""`fewstep compare A B`: two saved models side by side for the same noise and labels — one PNG grid (A's row
above B's, same noise and label in each column) and a markdown table of their metrics with 95% intervals over
sampling seeds, scored like the evaluate stage against a prepare stage's held-out images."""
from __future__ import annotations

from pathlib import Path

import torch

from fewstep.core import runtime
from fewstep.data.sources import load_prepared
from fewstep.core.grid import save_grid
from fewstep.io import ArtifactError
from fewstep.files import atomic_output
from fewstep.core.distances import kid
from fewstep.core.metrics import Evaluator, differ, fid_kid, over_seeds
from fewstep.data.featurizer import Featurizer
from fewstep.families.edm.unet import load_model
from fewstep.params import ParamsError
from fewstep.core.sampling import batched, nfe, sample_model

K = 3  # the evaluator's k for precision and recall
MIN_SAMPLES = K + 1


def count_problem(seeds: int, samples: int) -> str | None:
    """Why these counts cannot be compared, or None (the CLI's argument check and the library's)."""
    if seeds < 1:
        return f"--seeds must be >= 1, got {seeds}"
    if samples < MIN_SAMPLES:
        return (f"--samples must be >= {MIN_SAMPLES} (precision and recall use each sample's {K} nearest neighbours; "
                f"FID wants hundreds), got {samples}")
    return None


def compare(a: Path, b: Path, prepare: Path, grid: Path, seeds: int = 3, samples: int = 2000, rows: int = 5,
            columns: int = 10, seed: int = 0, device: str = "cpu", batch_size: int = 250) -> str:
    """Sample both models on the same noise and labels for `seeds` sampling seeds; write the grid; return the
    markdown table."""
    problem = count_problem(seeds, samples)
    if problem:
        raise ParamsError(problem)
    models = {str(path): load_model(path, device) for path in (a, b)}
    (model_a, _), (model_b, _) = models.values()
    if model_a.num_classes != model_b.num_classes or model_a.unet.config.sample_size != model_b.unet.config.sample_size:
        raise ArtifactError(f"{a} and {b} do not make the same images (classes or resolution differ)")
    _, data = load_prepared(prepare, splits=("test",))
    evaluator = Evaluator(Featurizer.load(prepare / "featurizer"), data["test_images"], k=K)
    c, size = model_a.unet.config.in_channels, model_a.unet.config.sample_size
    labels = torch.arange(samples) % model_a.num_classes
    features = {name: [] for name in models}
    scores = {name: [] for name in models}
    first = {}
    for i in range(seeds):
        noise = torch.randn((samples, c, size, size), generator=runtime.seeded(seed, f"compare/{i}"))
        for name, (model, info) in models.items():
            generator = runtime.seeded(seed, f"compare/renoise/{i}")  # the same re-noising for both
            images = batched(lambda n, y: sample_model(model, info, n, y, None, generator), noise, labels,
                             batch_size, device, f"{Path(name).as_posix()} seed {i}")
            features[name].append(evaluator.features(images))
            scores[name].append(evaluator.score(images, labels, features[name][-1]))
            first.setdefault(name, images)
    scored = []
    for name, (_, info) in models.items():
        metrics = over_seeds({"fid": [s["fid"] for s in scores[name]],  # scored per seed above
                              "kid": [kid(evaluator.real_features, f) for f in features[name]]})
        rest = {k: sum(s[k] for s in scores[name]) / seeds for k in ("precision", "recall", "pixel_w1")}
        scored.append((name, nfe(info), metrics, rest))
    paired = over_seeds(fid_kid(list(zip(features[str(a)], features[str(b)]))))

    def interval(m: dict, key: str, scale: float = 1.0) -> str:
        ci = m.get(f"{key}_ci95")
        return f"{m[key] * scale:.4g}" + (f" [{ci[0] * scale:.3g}, {ci[1] * scale:.3g}]" if ci else "")

    band = " [95%]" if seeds > 1 else ""  # one seed: no interval
    lines = [f"| model | NFE | FID ↓{band} | KID ×100{band} | pixel W1 ↓ | precision | recall |", "|---" * 7 + "|"]
    for name, steps, m, rest in scored:
        lines.append(f"| {name} | {steps} | {interval(m, 'fid')} | {interval(m, 'kid', 100)} | "
                     f"{rest['pixel_w1']:.4f} | {rest['precision']:.3f} | {rest['recall']:.3f} |")
    lines += ["", f"FID of {b} against {a}'s samples for the same noise and labels: {interval(paired, 'fid')}."]
    if seeds > 1:
        verdict = "differ" if differ(scored[0][2], scored[1][2]) else "do not differ (the intervals overlap)"
        lines.append(f"At 95% over {seeds} sampling seeds of {samples} samples, against {len(data['test_images'])} "
                     f"held-out images, the two FIDs {verdict}.")
    else:
        lines.append(f"One sampling seed gives no interval, so no verdict: FID {scored[0][2]['fid']:.4g} against "
                     f"{scored[1][2]['fid']:.4g} (--seeds 3 or more for 95% intervals).")
    columns = min(columns, samples)
    chunks, labels = [], []
    for r in range(max(1, min(rows, samples // columns))):  # A's row, then B's row, on the same noise and labels
        chunks += [first[str(a)][r * columns:(r + 1) * columns], first[str(b)][r * columns:(r + 1) * columns]]
        labels += [f"A {Path(a).as_posix()}", f"B {Path(b).as_posix()}"]
    with atomic_output(grid) as out:
        save_grid(torch.cat(chunks), out, nrow=columns, row_labels=labels)
    return "\n".join(lines) + "\n"
