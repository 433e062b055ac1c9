"""teacher: train a class-conditional diffusers UNet with EDM preconditioning (EMA weights are saved)."""
from pathlib import Path

import torch

from fewstep.core import parallel, runtime
from fewstep.pipeline.hashing import Hasher
from fewstep.core.checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from fewstep.data.sources import load_prepared
from fewstep.families.edm.unet import EDMDenoiser, build_unet, make_scheduler, save_model
from fewstep.core.training import Phase, RealBatches, edm_weighted_mse, ema_for, lognormal_sigmas, train


def main(params, args, device):
    p = params.teacher
    device = parallel.init(device)
    info, data = load_prepared(args.prepare, splits=("train",))
    num_classes = len(info["class_names"])
    unet = build_unet(info["resolution"], info["channels"], num_classes, p.channels, p.layers_per_block)
    model = EDMDenoiser(unet, make_scheduler(p.edm), num_classes).to(device)
    print(f"[teacher] UNet {list(unet.config.block_out_channels)}, "
          f"{sum(t.numel() for t in unet.parameters()) / 1e6:.2f} M params, {num_classes} classes", flush=True)
    parallel.synchronize(model)
    gen = runtime.seeded(params.seed, "teacher")  # the same on every rank: each takes its share of the batch
    batches = RealBatches(data["train_images"], data["train_labels"], p.batch_size, gen, device)

    def denoising_loss():
        images, labels = batches()
        drop = torch.rand(len(labels), generator=gen).to(device) < p.label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
        sigma = lognormal_sigmas(len(images), p.p_mean, p.p_std, gen).to(device)
        noise = torch.randn(images.shape, generator=gen).to(device)
        images, labels, sigma, noise = (parallel.mine(t) for t in (images, labels, sigma, noise))
        with runtime.autocast(params, device):
            pred = model(images + sigma.view(-1, 1, 1, 1) * noise, sigma, labels)
        return {"loss": edm_weighted_mse(pred.float(), images, sigma, p.edm.sigma_data)}

    ema = ema_for(model, p.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    with parallel.output(args.out) as out:
        key = fingerprint("teacher", params.seed, p.model_dump(mode="json"), Hasher().tree(args.prepare))
        folder = CHECKPOINTS / parallel.checkpoint_name(runtime.pipeline_name(args.params), "teacher")
        checkpoint = Checkpointer(folder, p.checkpoint_every, key, logs=out / "live")
        checkpoint.track(ema=ema, generator_rng=GeneratorState(gen))
        train([Phase("teacher", model, optimizer, denoising_loss)], p.steps, out / "live", desc="teacher",
              after_step=lambda step: ema.step(model.parameters()), checkpoint=checkpoint)
        ema.copy_to(model.parameters())
        save_model(model.eval(), out / "model", role="teacher", sampling_steps=18)
    parallel.finish()
    print(f"[teacher] EMA weights -> {args.out / 'model'}", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("teacher", main, configure)
