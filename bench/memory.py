"""Measured memory of data-parallel distillation: DDP (whole copies, averaged gradients) vs FSDP2 shards.

    python bench/memory.py [--sizes tiny mid] [--ranks 1 2 4] [--steps 3]     # the study (CPU, gloo)
    python bench/memory.py --sizes sdxl sd3 --ranks 1 2 --device cuda --precision bf16 --lora 0 64  # GPUs

Each configuration is one `torchrun` of this script's worker: random-weight SD-shaped UNets or SD3-shaped
transformers (rectified flows, fewstep.families.t2i.flow_denoiser) as teacher, student and fake score, with the GAN head; DMD2
distill steps through fewstep's trainer (`fewstep.core.distillation.fit`) on random text conditions. Per rank it
measures the bytes held of the trained networks' parameters, gradients and AdamW states (a shard counts its
local part), the peak memory (CUDA: max allocated; CPU: the highest RSS while training, above the RSS before
the models were built: teacher and activations included) and the time per step. A configuration that runs
out of memory is recorded as such. Writes bench/results/memory.{json,md} (`--results gpu`: gpu.{json,md}, what
bench/gpu.py runs). The worker alone:

    torchrun --nproc_per_node=2 bench/memory.py --worker --parallel fsdp --size tiny --out r.json
    python bench/memory.py --worker --virtual-ranks 2 ...   # one process replaying 2 ranks' batches

`--virtual-ranks N` runs one process on the global batch as N micro-batches, each drawn from the random
streams rank r would use: the reference the sharded losses must equal (tests/test_fsdp.py).
"""
from __future__ import annotations

import argparse
import json
import threading
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SD-shaped UNet2DConditionModel configs (the test's tiny one, a mid-size one a laptop trains, real SDXL) and
# SD3-shaped SD3Transformer2DModel ones (a tiny one, real SD3-medium), trained as rectified flows (fewstep.families.t2i.flow_denoiser)
SIZES = {
    "tiny": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "mid": dict(sample_size=16, block_out_channels=(128, 256, 512), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "sd3-tiny": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12,
                     pos_embed_max_size=8),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
}
TOKENS = 8  # text tokens per prompt (77 in real SD; the UNet's cost does not hinge on it)


class RssPeak(threading.Thread):
    """The highest resident memory of this process while training runs (sampled every 5 ms): the CPU's
    stand-in for CUDA's max_memory_allocated. Tensors this size are mmap'd, so freed memory leaves the RSS."""

    def __init__(self):
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(), 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.peak / 2**20


def _flow(size: str) -> bool:
    return size.startswith("sd3")


def _denoiser(size: str, seed: int, dtype, negative=None, compute=None):
    """A random-weight denoiser of the size: a UNet in VP/VE form, or an SD3 transformer as a rectified flow."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from fewstep.families.t2i.sd_denoiser import SDDenoiser, alphas_cumprod
    from fewstep.families.t2i.flow_denoiser import FlowDenoiser

    torch.manual_seed(seed)
    if _flow(size):
        return FlowDenoiser(SD3Transformer2DModel(**SIZES[size]).to(dtype), {"shift": 3.0}, negative, compute)
    abar = alphas_cumprod({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "num_train_timesteps": 1000})
    return SDDenoiser(UNet2DConditionModel(**SIZES[size]).to(dtype), abar, negative, autocast_dtype=compute)


def _conditions(size: str, generator, device):
    import torch

    from fewstep.families.t2i.sd_denoiser import SDCond

    config = SIZES[size]

    def draw(n: int) -> SDCond:
        if _flow(size):
            return SDCond(torch.randn(n, TOKENS, config["joint_attention_dim"], generator=generator),
                          torch.randn(n, config["pooled_projection_dim"], generator=generator)).to(device)
        embeds = torch.randn(n, TOKENS, config["cross_attention_dim"], generator=generator)
        if config.get("addition_embed_type") != "text_time":
            return SDCond(embeds).to(device)
        pooled = torch.randn(n, 1280, generator=generator)
        size_ids = torch.tensor([config["sample_size"] * 8] * 2 + [0, 0] + [config["sample_size"] * 8] * 2)
        return SDCond(embeds, pooled, size_ids.float().expand(n, -1)).to(device)
    return draw


class VirtualRanks:
    """Wraps an objective's loss closures so one process replays N ranks: micro-batch r of every update
    draws from rank r's stream (seed + r) and every micro-batch of an update from the same shared stream
    state (the student step all ranks draw alike)."""

    def __init__(self, objective, setup, ranks: int):
        import torch

        seed = setup.generator.initial_seed()
        self.setup, self.ranks, self.calls = setup, ranks, 0
        self.states = [torch.Generator().manual_seed(seed + r).get_state() for r in range(ranks)]
        objective.critic_loss = self.wrap(objective.critic_loss)
        objective.generator_loss = self.wrap(objective.generator_loss)

    def wrap(self, loss):
        def replay():
            r = self.calls % self.ranks
            if r == 0:
                self.shared = self.setup.step_generator.get_state()
            else:
                self.setup.step_generator.set_state(self.shared)
            self.setup.generator.set_state(self.states[r])
            parts = loss()
            self.states[r] = self.setup.generator.get_state()
            self.calls += 1
            return parts
        return replay


def _built(build, name, setup, ranks):
    objective = build(name, setup)
    VirtualRanks(objective, setup, ranks)
    return objective


def worker(args) -> None:
    import torch

    from fewstep.core import distillation, fsdp, objectives, parallel
    from fewstep.core.heads import GanHead
    from fewstep.families.t2i import networks as models
    from fewstep.families.t2i.t2i_trainer import noise_levels
    from fewstep.families.t2i import variants as families
    from fewstep.params import validate

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    device = fsdp.init(device) if args.parallel == "fsdp" else parallel.init(device)
    rank, ranks = parallel.world()
    import dvclive  # noqa: F401  (the trainer's logger: imported before the baseline, not counted as training memory)

    baseline_mb = psutil.Process().memory_info().rss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    virtual = args.virtual_ranks
    section = {"batch_size": args.batch_size * (virtual or ranks), "steps": args.steps, "lr": 1e-4, "log_every": 1,
               "checkpoint_every": 0, "grad_accum": virtual or 1, "student_timesteps": [999, 499],
               "lora": {"rank": args.lora}, "dmd2": {"ttur": 1, "gan": {"generator_weight": 5e-3, "critic_weight": 1e-2}}}
    settings = validate({"teacher": {"path": "unused", "family": "sdxl"}, "prompts": {"source": "unused"},
                         "distill": section}).distill
    generator = torch.Generator().manual_seed(args.seed)
    settings = parallel.per_rank(settings, "distill", generator)
    if virtual:  # grad_accum micro-batches of batch_size each, as the ranks would draw them
        settings = settings.model_copy(update={"batch_size": args.batch_size})

    compute = models.AUTOCAST[args.precision]
    frozen_dtype = models.frozen_dtype(device, args.precision)
    sharded = args.parallel == "fsdp"
    build_on = torch.device("cpu") if sharded else device
    negative = _conditions(args.size, torch.Generator().manual_seed(args.seed + 10**6), "cpu")(1)  # CFG's
    teacher = _denoiser(args.size, 0, frozen_dtype, negative, compute)
    teacher = teacher.to(build_on if args.teacher == "shard" else device).requires_grad_(False)
    student = _denoiser(args.size, 0, frozen_dtype if args.lora else torch.float32, compute=compute).to(build_on)
    if args.lora:
        student = models.with_lora(student, args.lora, None, ["to_q", "to_k", "to_v", "to_out.0"])
    fake = _denoiser(args.size, 0, torch.float32, compute=compute).to(build_on)
    torch.manual_seed(1)
    family = families.get("sd3" if _flow(args.size) else "sdxl")
    head, tap = GanHead(family.gan_channels(fake.unet)).to(build_on), family.gan_tap(fake.unet)
    student_params = sum(p.numel() for p in student.unet.parameters())
    if sharded:
        for module in (student, fake, head) + ((teacher,) if args.teacher == "shard" else ()):
            fsdp.shard(module, device, compute)
    else:
        parallel.synchronize(student, fake, head)

    captured = []  # the phases' optimizers, to measure their states
    make_optimizer = distillation.adamw
    distillation.adamw = lambda module, opt: captured.append(make_optimizer(module, opt)) or captured[-1]

    config = SIZES[args.size]
    latent = (config.get("in_channels", 4), config["sample_size"], config["sample_size"])
    conditions = _conditions(args.size, generator, device)
    setup = objectives.Setup(
        teacher=teacher, student=student, fake=fake, head=head, tap=tap,
        real=lambda: (torch.randn(settings.batch_size, *latent, generator=generator).to(device),
                      conditions(settings.batch_size)),
        conditions=conditions,
        noise_levels=noise_levels(teacher, settings.t_min, settings.t_max, generator, device),
        student_sigmas=[teacher.sigma_of(t) for t in settings.student_timesteps], params=settings,
        generator=generator, device=device, sigma_data=1.0,
        step_generator=torch.Generator().manual_seed(args.seed))
    if virtual:
        build = objectives.build
        objectives.build = lambda name, s: _built(build, name, s, virtual)

    with tempfile.TemporaryDirectory() as tmp:
        sampler = RssPeak()
        sampler.start()
        started = time.perf_counter()
        distillation.fit(setup, settings, Path(tmp), "distill")
        seconds = time.perf_counter() - started
        peak_rss = sampler.stop()
        live = Path(tmp) / "live/plots/metrics"
        losses = {phase: [float(row.split("\t")[1]) for row in (live / phase / "loss.tsv").read_text().split("\n")[1:] if row]
                  for phase in ("critic", "generator")}
    held = fsdp.trained_bytes(student, fake, head, *captured)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss - baseline_mb
    gathered = [None] * ranks
    row = {"trained_mb": held / 2**20, "peak_mb": peak}
    if ranks > 1:
        torch.distributed.all_gather_object(gathered, row)
    else:
        gathered = [row]
    parallel.finish()
    if rank == 0:
        result = {"parallel": args.parallel, "teacher": args.teacher if sharded else "replicate", "ranks": ranks,
                  "virtual_ranks": virtual, "size": args.size, "lora": args.lora, "device": device.type, "precision": args.precision,
                  "batch_per_rank": args.batch_size, "steps": args.steps,
                  "student_params_m": round(student_params / 1e6, 2),
                  "trained_mb_per_rank": max(r["trained_mb"] for r in gathered),
                  "peak_mb_per_rank": max(r["peak_mb"] for r in gathered),
                  "seconds_per_step": seconds / args.steps, "losses": losses}
        Path(args.out).write_text(json.dumps(result, indent=1))


def study(args) -> None:
    """Every (size, LoRA rank, parallel, ranks) configuration as one torchrun; JSON + markdown table."""
    rows = []
    for size in args.sizes:
        for lora in args.lora:
            for ranks in args.ranks:
                for mode, teacher in [("ddp", "replicate")] + [("fsdp", t) for t in args.teacher]:
                    with tempfile.NamedTemporaryFile(suffix=".json") as out:
                        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                               __file__, "--worker", "--parallel", mode, "--teacher", teacher, "--size", size, "--lora", str(lora),
                               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", args.device,
                               "--precision", args.precision, "--threads", str(args.threads), "--out", out.name]
                        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                        if proc.returncode and "out of memory" in proc.stderr.lower():
                            row = {"parallel": mode, "teacher": teacher, "ranks": ranks, "size": size, "lora": lora,
                                   "student_params_m": None, "trained_mb_per_rank": None, "peak_mb_per_rank": "OOM",
                                   "seconds_per_step": None, "losses": None}
                        elif proc.returncode:
                            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                            raise SystemExit(f"bench/memory.py: {mode} x{ranks} {size} failed ({proc.returncode})")
                        else:
                            row = json.loads(Path(out.name).read_text())
                    row.pop("losses")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    results = ROOT / "bench/results"
    (results / f"{args.results}.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    lines = ["| size | student M params | LoRA | parallel | teacher | ranks | trained state MB / rank | peak MB / rank "
             "| s / step |", "|---|---|---|---|---|---|---|---|---|"]
    number = lambda value, digits: "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"
    lines += [f"| {r['size']} | {number(r['student_params_m'], 1)} | {r['lora'] or 'full'} | {r['parallel']} | "
              f"{r['teacher']} | {r['ranks']} | {number(r['trained_mb_per_rank'], 1)} | {number(r['peak_mb_per_rank'], 0)} | "
              f"{number(r['seconds_per_step'], 2)} |" for r in rows]
    (results / f"{args.results}.md").write_text(
        f"# Memory per rank: DDP vs FSDP2 ({args.device}, {args.precision}, batch {args.batch_size} per rank, "
        f"{args.steps} DMD2 steps)\n\nMade by `python bench/memory.py {' '.join(sys.argv[1:])}`. Trained state = "
        "parameters + gradients + AdamW states of student, fake score and GAN head held by one rank; peak = "
        + ("max CUDA memory allocated" if args.device == "cuda" else "the highest RSS while training, above the "
           "RSS before the models were built (teacher and activations included)") + ".\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help="one configuration (under torchrun)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--lora", nargs="+", type=int, default=[0])
    parser.add_argument("--teacher", nargs="+", choices=["replicate", "shard"], default=["replicate", "shard"],
                        help="fsdp: the frozen teacher whole on every rank, or sharded too")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--virtual-ranks", type=int, default=0)
    parser.add_argument("--out", default="memory-row.json")
    parser.add_argument("--results", default="memory", help="the study's files: bench/results/<results>.{json,md}")
    args = parser.parse_args()
    if args.worker:
        args.lora, args.teacher = args.lora[0], args.teacher[0]
        worker(args)
    else:
        study(args)


if __name__ == "__main__":
    main()
