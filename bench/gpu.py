"""The real-size GPU study: random-weight SDXL-shaped and SD3-shaped students (teacher, fake score and GAN head
alongside) take DMD2 distill steps in bf16 through fewstep's trainer; per configuration the step time and the peak
CUDA memory per process, full student vs a rank-64 LoRA one, 1 vs 2 processes, DDP vs FSDP2. It is
bench/memory.py's study with these settings, written to bench/results/gpu.{json,md} (the CPU study's
memory.{json,md} stay as they are):

    python bench/gpu.py                 # every configuration (2-process rows need 2 GPUs)
    python bench/gpu.py --steps 5       # further bench/memory.py options pass through
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

MEMORY = Path(__file__).resolve().parent / "memory.py"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; this study measures GPU memory "
                         "(the CPU study: python bench/memory.py, docs/gpu.md)")
    ranks = ["1", "2"] if torch.cuda.device_count() >= 2 else ["1"]
    if ranks == ["1"]:
        print("bench/gpu.py: one GPU visible: the 2-process rows are skipped", flush=True)
    sys.argv = [str(MEMORY), "--sizes", "sdxl", "sd3", "--device", "cuda", "--precision", "bf16", "--ranks", *ranks,
                "--lora", "0", "64", "--results", "gpu", *sys.argv[1:]]
    runpy.run_path(str(MEMORY), run_name="__main__")


if __name__ == "__main__":
    main()
