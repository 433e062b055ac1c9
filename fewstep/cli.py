"""The `fewstep` command: sample a saved teacher or student into a grid PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def sample(args) -> None:
    import torch

    from .grid import save_grid
    from .models import load_model
    from .sampling import nfe, sample_model

    model, info = load_model(args.model, args.device)
    if info["role"] not in ("teacher", "student"):
        raise SystemExit(f"fewstep sample: {args.model} is a {info['role']}, not a teacher or student model")
    gen = torch.Generator().manual_seed(args.seed)
    c, size = model.unet.config.in_channels, model.unet.config.sample_size
    n = args.rows * args.rows
    labels = torch.arange(n) % model.num_classes if args.label is None else torch.full((n,), args.label)
    noise = torch.randn((n, c, size, size), generator=gen)
    images = sample_model(model, info, noise.to(args.device), labels.to(args.device), args.steps, gen)
    save_grid(images, args.out, nrow=args.rows)
    print(f"{info['role']} {args.model}: {n} samples, {nfe(info, args.steps)} NFE -> {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write a grid of samples from a saved teacher or student")
    s.add_argument("--model", type=Path, required=True, help="a model directory, e.g. finetune/student")
    s.add_argument("--steps", type=int, default=None,
                   help="sampling steps (teacher: Heun steps, NFE = 2N-1; student: its trained steps by default)")
    s.add_argument("--out", type=Path, default=Path("grid.png"))
    s.add_argument("--rows", type=int, default=10, help="grid is rows x rows (default 10)")
    s.add_argument("--label", type=int, default=None, help="one class for every sample (default: one class per column)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    from .io import ArtifactError

    try:
        sample(args)
    except ArtifactError as exc:
        print(f"fewstep: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
