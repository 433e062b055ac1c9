"""mini_teacher: a teacher of the family's own diffusers architecture trained here on the real training images,
captioned `a handwritten digit k`, in the latents of mini_vae's AutoencoderKL, with the family's own training
loss and caption dropout to the pipeline's negative branch (for classifier-free guidance). Writes the diffusers
pipeline directory (EMA weights) at teacher.path, with the recommended call in its fewstep.json."""
import tempfile
from pathlib import Path

import torch

from fewstep.core import runtime
from fewstep.core.checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from fewstep.data.sources import load_prepared
from fewstep.pipeline.hashing import Hasher
from fewstep.files import atomic_output
from fewstep.io import write_json
from fewstep.core.parallel import checkpoint_name
from fewstep.params import ParamsError
from fewstep.families.t2i import encode, variants, mini
from fewstep.families.t2i.sd_denoiser import SDCond, alphas_cumprod
from fewstep.core.training import Phase, RealBatches, ema_for, train


def conditions(pipe, family: str, num_classes: int, resolution: int, device) -> SDCond:
    """Rows 0..k-1: each digit's caption through the pipeline's own encode_prompt; row k: its negative branch
    (SDXL: zeros for the empty prompt; SD1.5, SD3: the empty prompt's embedding), the dropped caption."""
    cond = SDCond.cat([encode.encode_texts(pipe, [mini.caption(k) for k in range(num_classes)], family,
                                           num_classes, device, progress=False),
                       encode.encode_negative(pipe, "", family, device)])
    if variants.get(family).time_ids:
        ids = torch.tensor([encode.sdxl_time_ids(resolution)]).expand(len(cond), 6)
        cond = SDCond(cond.embeds, cond.pooled, ids.clone())
    return cond


def main(params, args, device):
    if params.teacher.mini is None:
        raise ParamsError("teacher.mini is not set: this pipeline's teacher is not trained here")
    p, family = params.teacher.mini, params.teacher.family
    info, data = load_prepared(args.prepare, splits=("train",))
    num_classes = len(info["class_names"])
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL.from_pretrained(args.vae / "vae")
    images = mini.upsample(data["train_images"], p.resolution)
    latents = encode.to_latents(autoencoder, images, 256, device)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = mini.pipeline(family, autoencoder, p.width, p.depth, latents.shape[-1], params.seed, Path(scratch))
    network = getattr(pipe, variants.get(family).network).to(device).train()
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False).eval()
    cond = conditions(pipe, family, num_classes, p.resolution, device).to(device)
    schedule = ({"shift": pipe.scheduler.config.shift} if variants.get(family).flow
                else {"alphas_cumprod": alphas_cumprod(dict(pipe.scheduler.config))})
    print(f"[mini_teacher] {family}: {type(network).__name__} {sum(t.numel() for t in network.parameters()) / 1e6:.2f} M "
          f"params on {tuple(latents.shape[1:])} latents of {len(latents)} images, {num_classes} captions", flush=True)

    gen = runtime.seeded(params.seed, "mini_teacher")
    batches = RealBatches(latents, data["train_labels"], p.batch_size, gen, device)

    def loss():
        x, labels = batches()
        dropped = torch.rand(len(labels), generator=gen).to(device) < p.caption_dropout
        rows = torch.where(dropped, torch.full_like(labels, num_classes), labels)
        with runtime.autocast(params, device):
            return {"loss": mini.denoising_loss(network, family, x, cond[rows], schedule, gen)}

    ema = ema_for(network, p.ema_decay)
    optimizer = torch.optim.AdamW(network.parameters(), lr=p.lr, weight_decay=0.01)
    with atomic_output(args.out) as out:
        key = fingerprint("mini_teacher", params.seed, p.model_dump(mode="json"), Hasher().tree(args.prepare),
                          Hasher().tree(args.vae))
        checkpoint = Checkpointer(CHECKPOINTS / checkpoint_name(runtime.pipeline_name(args.params), "mini_teacher"),
                                  p.checkpoint_every, key, logs=out / "live")
        checkpoint.track(ema=ema, generator_rng=GeneratorState(gen))
        train([Phase("teacher", network, optimizer, loss, grad_clip=1.0)], p.steps, out / "live", desc="mini_teacher",
              after_step=lambda step: ema.step(network.parameters()), checkpoint=checkpoint)
        ema.copy_to(network.parameters())
        pipe.to("cpu").save_pretrained(out)
        write_json({"role": "teacher", "trained_on": info["source"], "caption": mini.CAPTION,
                    "num_inference_steps": p.sampling_steps, "guidance_scale": p.guidance,
                    "usage": f"{type(pipe).__name__}.from_pretrained(dir)(prompt, num_inference_steps="
                             f"{p.sampling_steps}, guidance_scale={p.guidance})"}, out / "fewstep.json")
    print(f"[mini_teacher] EMA weights -> {args.out} (recommended call: {p.sampling_steps} steps, "
          f"guidance {p.guidance})", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("mini_teacher", main, configure)
