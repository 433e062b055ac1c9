"""Family-agnostic distillation: the denoiser contract, the objectives, the trainer, sampling, checkpoints,
DDP/FSDP2, metrics and intervals, the evaluation loop. It imports no family."""
