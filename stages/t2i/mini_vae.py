"""mini_vae: the mini teacher's AutoencoderKL, trained on the real training images upsampled to
teacher.mini.resolution (a *-digits pipeline's first model; its latent scale is set from those images)."""
from pathlib import Path

import torch

from fewstep.core import runtime
from fewstep.core.checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from fewstep.data.sources import load_prepared
from fewstep.pipeline.hashing import Hasher
from fewstep.files import atomic_output
from fewstep.params import ParamsError
from fewstep.families.t2i import variants, mini
from fewstep.core.training import Phase, RealBatches, train
from fewstep.core.parallel import checkpoint_name


def main(params, args, device):
    if params.teacher.mini is None:
        raise ParamsError("teacher.mini is not set: this pipeline's teacher is not trained here")
    p, flow = params.teacher.mini, variants.get(params.teacher.family).flow
    _, data = load_prepared(args.prepare, splits=("train",))
    images = mini.upsample(data["train_images"], p.resolution)
    torch.manual_seed(params.seed)
    autoencoder = mini.vae(p.vae.channels, flow=flow).to(device)
    gen = runtime.seeded(params.seed, "mini_vae")
    batches = RealBatches(images, data["train_labels"], p.vae.batch_size, gen, device)
    print(f"[mini_vae] {len(images)} images at {p.resolution}x{p.resolution}, AutoencoderKL {p.vae.channels} "
          f"({sum(t.numel() for t in autoencoder.parameters()) / 1e6:.2f} M params)", flush=True)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=p.vae.lr)
    loss = lambda: mini.vae_loss(autoencoder, batches()[0], p.vae.kl_weight, gen)
    with atomic_output(args.out) as out:
        key = fingerprint("mini_vae", params.seed, p.model_dump(mode="json"), Hasher().tree(args.prepare))
        checkpoint = Checkpointer(CHECKPOINTS / checkpoint_name(runtime.pipeline_name(args.params), "mini_vae"),
                                  p.checkpoint_every, key, logs=out / "live")
        checkpoint.track(generator_rng=GeneratorState(gen))
        train([Phase("vae", autoencoder, optimizer, loss, grad_clip=1.0)], p.vae.steps, out / "live", desc="mini_vae",
              checkpoint=checkpoint)
        autoencoder.eval()
        mini.set_latent_scale(autoencoder.cpu(), images, flow)
        autoencoder.save_pretrained(out / "vae")
    print(f"[mini_vae] scaling_factor {autoencoder.config.scaling_factor:g} -> {args.out / 'vae'}", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("mini_vae", main, configure)
