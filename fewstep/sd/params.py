"""params.yaml schema of the text-to-image pipelines (pipelines/sdxl, pipelines/sd15, pipelines/sd3).

Same rules as fewstep.params: unknown keys, wrong types and impossible values fail at stage start with
one line naming the dotted key. SDXL, SD1.5 and SD3 share this schema; they differ in values only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..inputs import InputPath
from ..params import (DMD2Params, GanParams, ObjectiveParams, Pair, RunParams, Section, TrainLoopParams,
                      TrajectoriesParams)
from ..params import load as _load


class SDRunParams(RunParams):
    gradient_checkpointing: bool = False  # trade compute for memory in every trained UNet (GPU runs)
    launcher: str = "python"  # how critic/distill/finetune start, e.g. "torchrun --standalone --nproc_per_node=8"
    # how the launcher's processes share the training: ddp = full copies + averaged gradients; fsdp = FSDP2
    # (each process holds 1/N of the trained weights, gradients and optimizer states; docs/gpu.md)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    shard_teacher: bool = False  # fsdp: shard the frozen teacher too (else each process keeps a whole copy)


class TeacherParams(Section):
    path: str                                # a local diffusers pipeline directory (or a hub id, network permitting)
    family: Literal["sdxl", "sd15", "sd3"] = "sdxl"  # which pipeline layout teacher.path must have (fewstep/sd/family.py)


class PromptsParams(Section):
    source: str                      # a text file (one prompt a line) or a `datasets` save_to_disk directory
    text_column: str = "text"        # datasets only
    image_column: str | None = None  # datasets only: real images for the GAN (else teacher samples stand in)
    eval_count: int = Field(8, gt=0)  # prompts held out for evaluation; the rest train
    max_prompts: int = Field(0, ge=0)  # 0: every prompt of the source


class EncodeParams(Section):
    resolution: int | None = Field(None, gt=0)  # image side in pixels; null = the teacher's native size
    batch_size: int = Field(16, gt=0)
    shard_size: int = Field(1024, gt=0)
    negative_prompt: str = ""           # the unconditional branch of classifier-free guidance
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"  # storage of cached embeddings and latents


class SDTrajectoriesParams(TrajectoriesParams):
    """fewstep.params.TrajectoriesParams with text-to-image defaults and the held-out prompts' split."""

    num_samples: int = Field(64, gt=0)     # teacher samples, prompts taken in turn from the train split
    eval_per_prompt: int = Field(1, gt=0)  # teacher samples per held-out prompt (the evaluation's pairs)
    sampling_steps: int = Field(25, gt=0)  # EDM Heun steps on the teacher's noise range
    guidance: float = Field(8.0, ge=0)     # DMD2: 8 for SDXL, 1.75 for SD1.5
    batch_size: int = Field(8, gt=0)
    shard_size: int = Field(256, gt=0)
    keep_states: bool = False              # latents' states are large: kept for the consistency objective only


class LoraParams(Section):
    rank: int = Field(0, ge=0)  # 0: train the full student UNet; > 0: a LoRA student of this rank (peft)
    alpha: float | None = Field(None, gt=0)  # LoRA scale numerator; null = rank
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class SDLoopParams(TrainLoopParams):
    """The one trainer's knobs (fewstep.params.TrainLoopParams) with SD-sized defaults."""

    batch_size: int = Field(4, gt=0)
    lr: float = Field(5e-7, gt=0)            # DMD2's SDXL learning rate
    betas: Pair = (0.9, 0.999)  # DMD2 reference AdamW
    ema_decay: float = Field(0.0, ge=0, lt=1)  # DMD2's reference keeps no EMA (0: no shadow copy is held)
    checkpoint_every: int = Field(100, ge=0)


class CriticParams(SDLoopParams):
    steps: int = Field(50, gt=0)
    gan: GanParams = GanParams(generator_weight=5e-3, critic_weight=1e-2)


class DistillParams(SDLoopParams, ObjectiveParams):
    """fewstep.params.ObjectiveParams with SD-sized loop defaults, DDPM timesteps and a LoRA option."""

    steps: int = Field(200, gt=0)
    student_timesteps: list[int] = [999, 749, 499, 249]  # DDPM timesteps the student is conditioned on
    real_guidance: float = Field(8.0, ge=0)   # CFG on the real score (DMD2: 8 for SDXL, 1.75 for SD1.5)
    t_min: int = Field(20, ge=0, le=999)      # DM / fake-score timesteps ~ U{t_min..t_max} of the DDPM steps
    t_max: int = Field(980, ge=1, le=999)
    lora: LoraParams = LoraParams()
    dmd2: DMD2Params = DMD2Params(ttur=5, gan=GanParams(generator_weight=5e-3, critic_weight=1e-2))

    @field_validator("student_timesteps")
    @classmethod
    def _timesteps(cls, v):
        if not v or any(not 0 <= t <= 999 for t in v) or any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError(f"must be a non-empty, strictly decreasing list of timesteps in [0, 999], got {v}")
        return v


class FinetuneParams(DistillParams):
    steps: int = Field(50, gt=0)
    lr: float = Field(2e-7, gt=0)


class FidParams(Section):
    featurizer: InputPath = None  # .pt2 / TorchScript (images in [-1, 1] -> features; or the FID Inception) or a fewstep featurizer dir
    reference: InputPath = None   # a folder of reference images (searched recursively)


class EvaluateParams(Section):
    batch_size: int = Field(8, gt=0)  # also the batch at which latency is timed (median over the batches)
    grid_size: int = Field(4, gt=0)
    clip_path: InputPath = None              # a local CLIP model directory: enables the CLIP score
    fid: FidParams = FidParams()


class BenchmarkParams(Section):
    """DMD2's text-to-image protocol on local caption/image pairs (fewstep.sd.benchmark); off while source is unset."""

    source: InputPath = None         # an imagefolder (images + metadata.jsonl: file_name, text) or a save_to_disk dataset
    text_column: str = "text"
    image_column: str = "image"
    count: int = Field(0, ge=0)      # pairs drawn by a seeded shuffle; 0 = all (DMD2: 10k COCO-2014 for SDXL, 30k for SD1.5)
    resolution: int = Field(512, gt=0)  # both image sets are resized to this before the featurizer (DMD2: 512 / 256)
    featurizer: InputPath = None     # FID's network: the FID Inception (inception-2015-12-05.pt, TorchScript), a .pt2, ...
    clip_path: InputPath = None      # a local CLIP model directory (transformers CLIPModel) for the CLIP score
    teacher: bool = True             # also sample the teacher (trajectories' steps and guidance) on every caption
    batch_size: int = Field(8, gt=0)  # also the batch at which latency is timed (median over the batches)
    bootstrap: int = Field(100, ge=0)  # resamples of the generated images for FID's 95% interval; 0 = none
    grid_size: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _something_to_score(self):
        if self.source and not (self.featurizer or self.clip_path):
            raise ValueError("source is set but neither featurizer nor clip_path: nothing to score")
        return self


class SDParams(Section):
    seed: int = Field(0, ge=0)
    run: SDRunParams = SDRunParams()
    teacher: TeacherParams
    prompts: PromptsParams
    encode: EncodeParams = EncodeParams()
    trajectories: SDTrajectoriesParams = SDTrajectoriesParams()
    critic: CriticParams = CriticParams()
    distill: DistillParams = DistillParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    benchmark: BenchmarkParams = BenchmarkParams()


def load(path: str | Path) -> SDParams:
    return _load(path, SDParams)
