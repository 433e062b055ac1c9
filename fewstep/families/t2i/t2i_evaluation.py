"""The text-to-image families' evaluation for stages/evaluate.py (`--family fewstep/families/t2i/t2i_evaluation.py`), and its
optional image metrics, each from a local model the user points at: CLIP score (a transformers CLIP
directory) and FID (fewstep.core.distances, a featurizer + reference images). A metric whose inputs are not
configured is skipped with a notice saying what would enable it."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fewstep.core.evaluation import Evaluation, Model, student_sampler
from fewstep.io import ArtifactError, load_trajectories
from fewstep.core.metrics import mean_interval, over_seeds
from fewstep.core.sampling import heun_sample
from fewstep.families.t2i import encode, networks, teacher as teachers
from fewstep.families.t2i import launch as start_up
from fewstep.families.t2i.prompts import image_tensor
from fewstep.families.t2i.encoded import Encoded

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ClipScorer:
    """Per-image CLIP score, 100 * cos(image embedding, caption embedding), from a local transformers CLIP
    directory: torchmetrics' CLIPScore is their mean clamped at 0 (tests check it); the per-image values
    give the mean its interval."""

    def __init__(self, path: str, device, key: str = "evaluate.clip_path"):
        from transformers import CLIPModel, CLIPProcessor

        if not Path(path).is_dir():
            raise ArtifactError(f"{key}: {path} is not a local CLIP model directory")
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{key}: {path} is not a CLIP model directory ({str(exc).splitlines()[0]})") from None
        self.device = device

    @staticmethod
    def _tensor(out) -> torch.Tensor:  # transformers 5: an output object with the projection in pooler_output
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        text = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        pixels = self.processor(images=list(uint8(images)), return_tensors="pt")["pixel_values"]
        image = self._tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        caption = self._tensor(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                             attention_mask=text["attention_mask"].to(self.device)))
        image, caption = image / image.norm(dim=-1, keepdim=True), caption / caption.norm(dim=-1, keepdim=True)
        return (100 * (image * caption).sum(-1)).float().cpu()


def per_image_mean(scores: torch.Tensor) -> tuple[float, list[float] | None]:
    """A per-image score's mean and its 95% t-interval over the images (independent draws, one per caption):
    core.metrics' one interval scheme for a single sampling seed."""
    return float(scores.double().mean()), mean_interval(scores)


def clip_score(scorer: ClipScorer, images: torch.Tensor, prompts: list[str], batch_size: int) -> tuple[float, list[float] | None]:
    """Mean CLIP score of images and their prompts, and its 95% interval over the images."""
    scores = torch.cat([scorer(images[i:i + batch_size], prompts[i:i + batch_size])
                        for i in range(0, len(images), batch_size)])
    return per_image_mean(scores)


class InceptionFeatures(nn.Module):
    """The FID Inception of StyleGAN2-ADA and clean-fid (inception-2015-12-05.pt, TorchScript): it takes pixel
    values in [0, 255] at any size (resizing to 299 inside) and gives its 2048 pool features when asked with
    return_features=True. Wrapped to the convention of every other featurizer here: images in [-1, 1]."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() + 1) * 127.5, return_features=True)


def _takes_return_features(net) -> bool:
    schema = getattr(getattr(net, "forward", None), "schema", None)
    return schema is not None and any(a.name == "return_features" for a in schema.arguments)


def load_featurizer(path: str, resolution: int, key: str = "evaluate.fid.featurizer") -> nn.Module:
    """A torch.export program (.pt2, batch dimension dynamic), a TorchScript module (the FID Inception among
    them, recognized by its return_features argument), or a fewstep featurizer directory (e.g. the digits
    pipeline's prepare/featurizer). `key` names the params key in the error line."""
    from fewstep.data.featurizer import Featurizer

    p = Path(path)
    if p.is_dir() and (p / "featurizer.json").is_file():
        return Featurizer.load(p)
    try:
        net = torch.export.load(str(p)).module() if p.suffix == ".pt2" else torch.jit.load(str(p), map_location="cpu")
        if _takes_return_features(net):
            net = InceptionFeatures(net)
        with torch.no_grad():  # it must take this resolution's images: say so at load, in this line
            net(torch.zeros(1, 3, resolution, resolution))
        return net
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"{key}: {path} is not a torch.export program (.pt2), a TorchScript module or a fewstep "
                            f"featurizer directory ({str(exc).splitlines()[0]})") from None


def reference_images(folder: str, resolution: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if len(files) < 2:
        raise ArtifactError(f"evaluate.fid.reference: {folder} holds {len(files)} images; FID needs at least 2")
    return image_tensor([Image.open(f) for f in files], resolution)


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int, device="cpu") -> torch.Tensor:
    """(N, D) features of images in [-1, 1] from a loaded featurizer (on `device`), computed once per image set
    so that FID against the reference and fidelity to the teacher share them."""
    return torch.cat([net(chunk.to(device, torch.float32)).float().cpu() for chunk in images.split(batch_size)])


# --- fidelity to the teacher: needs nothing but the teacher -----------------------------------------

FEATURE_TIMESTEP = 200  # DDPM timestep at which the teacher's UNet looks at a sample for its features


@torch.no_grad()
def teacher_features(teacher: nn.Module, latents: torch.Tensor, cond, batch_size: int, device,
                     seed: int) -> torch.Tensor:
    """(N, C) features every teacher gives with no other model: its UNet's mid-block output averaged over
    space (a transformer's: its middle block's image tokens, averaged), for each latent noised to FEATURE_TIMESTEP
    (a fixed noise per image) under its own prompt. What the teacher's denoiser sees of a sample; the stand-in
    for Inception when evaluate.fid.featurizer is unset."""
    from fewstep.core.sampling import batched
    from fewstep.families.t2i.variants import of_network

    captured: list[torch.Tensor] = []
    block, pool = of_network(teacher.unet).feature_block(teacher.unet)
    hook = block.register_forward_hook(lambda module, args, out: captured.append(pool(out).cpu()))
    try:
        sigma = teacher.sigma_of(FEATURE_TIMESTEP)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        batched(lambda x, c: teacher(x, sigma, c), latents.float() + sigma * noise, cond, batch_size, device)
    finally:
        hook.remove()
    return torch.cat(captured)


def halves(count: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the first and the second half of the evaluation rounds (row i is round i // prompts of prompt
    i % prompts): the same prompts in both halves, under different noise."""
    prompts = count // rounds
    cut = (rounds // 2) * prompts
    return torch.arange(cut), torch.arange(cut, 2 * cut)


def fidelity(features: dict[str, torch.Tensor], images: dict[str, torch.Tensor], rounds: int) -> dict[str, dict]:
    """FID-T and KID-T (and pixel W1 to the teacher's images): each model's first-half samples against the
    teacher's second half. The teacher's own first half against its second is the floor: same prompts, other
    noise. Both halves hold as many images, so the student's numbers compare with the teacher's."""
    from fewstep.core.distances import fid, kid, pixel_view

    first, second = halves(len(features["teacher"]), rounds)
    reference, reference_images = features["teacher"][second], images["teacher"][second]
    return {name: {"fid_t": fid(reference, f[first]), "kid_t": kid(reference, f[first]),
                   "pixel_w1_t": pixel_view(images[name][first], reference_images)["pixel_w1"]}
            for name, f in features.items()}


# --- the evaluation the shared stage runs (stages/evaluate.py --family fewstep/families/t2i/t2i_evaluation.py) -------------

INPUTS = {"encode": "the encode stage's output (cached held-out prompts)"}
launch = start_up.run  # start-up: params of a text-to-image family, continued from the repository root


def image_metrics(p, images: dict, prompts: list[str], resolution: int,
                  features: dict[str, torch.Tensor] | None, net, device) -> tuple[dict, list[str]]:
    """{model: {metric: value}} for the optional metrics, and a notice for each one skipped. `features`: each
    model's images in the configured featurizer `net` (None when unset)."""
    from fewstep.core.distances import fid

    scores, skipped = {name: {} for name in images}, []
    if p.clip_path:
        scorer = ClipScorer(p.clip_path, device)  # loaded once for every model's images
        for name, x in images.items():
            scores[name]["clip_score"], scores[name]["clip_score_ci95"] = clip_score(scorer, x, prompts, p.batch_size)
    else:
        skipped.append("clip_score: skipped (set evaluate.clip_path to a local CLIP model directory)")
    if features is not None and p.fid.reference:
        reference = embed(net, reference_images(p.fid.reference, resolution), p.batch_size)
        for name, f in features.items():
            scores[name]["fid"] = fid(reference, f)
    else:
        skipped.append("fid: skipped (set evaluate.fid.featurizer to a feature network and evaluate.fid.reference "
                       "to a folder of reference images)")
    return scores, skipped


def _over_seeds(per_seed: list[dict]) -> dict:
    """One sampling seed's scores, or their means over the seeds with 95% t-intervals (in place of one seed's
    per-sample intervals)."""
    if len(per_seed) == 1:
        return per_seed[0]
    return over_seeds({key: [r[key] for r in per_seed] for key, value in per_seed[0].items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)})


def evaluation(params, args, device) -> Evaluation:
    """The student against the teacher on the held-out prompts, same noise (sampling seed 0: the trajectories'
    eval split; evaluate.seeds > 1 adds fresh noise for both, and the scores are averaged): fidelity to the
    teacher always (FID-T, KID-T, pixel W1 against the teacher's other samples of the same prompts; the
    teacher's own score is the floor), in the configured featurizer's space or else the teacher network's;
    CLIP score when evaluate.clip_path is set and FID when evaluate.fid.featurizer and evaluate.fid.reference
    are set (otherwise the metrics say what was skipped and why). Latency is in latent space (text encoding and
    decoding excluded)."""
    p = params.evaluate
    path = teachers.resolve(params.teacher.path, params.teacher.family)
    held_out = Encoded.load(args.encode, "eval")
    traj = load_trajectories(args.trajectories, "eval")
    cond = held_out.cond[traj["cond_index"]]
    prompts = [held_out.texts[i] for i in traj["cond_index"].tolist()]
    teacher = networks.teacher_denoiser(path, held_out.negative, device, params.run.precision)
    student, info = networks.load(args.student, path, held_out.negative, device, params.run.precision)
    student.requires_grad_(False).eval()
    sigmas = [teacher.sigma_of(t) for t in info["student_timesteps"]]
    steps, guidance = traj["index"]["sampling_steps"], traj["index"]["guidance"]
    vae = teachers.load_vae(path)
    del vae.encoder  # decoding only: the encoder's work was cached by the encode stage
    resolution = held_out.index["resolution"]
    rounds = len(cond) // len(held_out.texts)  # trajectories.eval_per_prompt samples of each held-out prompt

    def score_seed(latents: dict[str, torch.Tensor], images: dict[str, torch.Tensor], net) -> tuple[dict, list]:
        features = {name: embed(net, x, p.batch_size) for name, x in images.items()} if net else None
        scores, skipped = image_metrics(p, images, prompts, resolution, features, net, device)
        if rounds >= 2:  # fidelity in the featurizer's space, else in the teacher network's (needs no other model)
            space = features or {name: teacher_features(teacher, x, cond, p.batch_size, device, params.seed)
                                 for name, x in latents.items()}
            for name, values in fidelity(space, images, rounds).items():
                scores[name].update(values)
        else:
            skipped.append("fid_t: skipped (set trajectories.eval_per_prompt >= 2: the teacher's other samples of a "
                           "prompt are FID-T's reference)")
        return scores, skipped

    def score(samples: dict[str, list[torch.Tensor]], decoded: dict[str, list[torch.Tensor]]) -> dict:
        net = load_featurizer(p.fid.featurizer, resolution) if p.fid.featurizer else None
        runs = [score_seed({name: x[i] for name, x in samples.items()}, {name: x[i] for name, x in decoded.items()},
                           net) for i in range(p.seeds)]
        skipped = runs[0][1]
        metrics = {"teacher": {"steps": steps, "guidance": guidance},
                   "student": {"steps": len(sigmas), "timesteps": info["student_timesteps"]}}
        if rounds >= 2:
            metrics["fidelity_features"] = p.fid.featurizer or f"teacher network's middle block, t={FEATURE_TIMESTEP}"
        for name in decoded:
            metrics[name].update(_over_seeds([scores[name] for scores, _ in runs]))
        for line in skipped:
            print(f"[evaluate] {line}", flush=True)
        return {**metrics, "skipped": skipped, "num_samples": len(cond), "num_prompts": len(held_out.texts),
                "seeds": p.seeds}

    run_teacher = lambda n, c: heun_sample(teacher, n, c, steps, guidance)
    sampled = {"teacher": Model(traj["index"]["nfe"], lambda i: run_teacher),
               "student": Model(len(sigmas), lambda i: student_sampler(student, sigmas, params.seed, i))}
    return Evaluation(models=sampled, student="student", noise=traj["noise"], cond=cond,
                      teacher_samples=traj["samples"], seeds=p.seeds,
                      decode=lambda x: encode.to_images(vae, x, p.batch_size, device), score=score,
                      grids=["teacher", "student"], captions=prompts)
