"""The schema, section by section: one pydantic model per params.yaml section (and subsection), the same in
every family; a key only some families have says which (`only`)."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from fewstep.params.markers import EDM, TEXT_TO_IMAGE, Family, Pair, Section, only, ordered
from fewstep.pipeline.inputs import InputPath


class RunParams(Section):
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: int = Field(0, ge=0)  # 0: torch's default
    launcher: str = "python"  # how training stages start; data parallel: "torchrun --standalone --nproc_per_node=8"
    # text-to-image UNets / transformers: recompute activations in backward (GPU memory for compute)
    gradient_checkpointing: bool = only(TEXT_TO_IMAGE, False)
    # how the launcher's processes share the training: ddp = full copies + averaged gradients; fsdp = FSDP2
    # (each process holds 1/N of the trained weights, gradients and optimizer states; docs/gpu.md)
    parallel: Literal["ddp", "fsdp"] = only(TEXT_TO_IMAGE, "ddp")
    shard_teacher: bool = only(TEXT_TO_IMAGE, False)  # fsdp: shard the frozen teacher too (else a whole copy each)


# --- the edm family's own stages: prepare (data + evaluation classifier) and a teacher trained from data ---


class DataParams(Section):
    source: str = "digits"  # "digits", an image folder (one sub-folder per class), or a save_to_disk dataset
    resolution: int = Field(8, ge=4, le=512)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_column: str = "image"
    label_column: str = "label"


class FeaturizerParams(Section):
    steps: int = Field(600, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    features: int = Field(128, gt=0)


class EDMParams(Section):
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    rho: float = Field(7.0, gt=0)

    _ordered = ordered("sigma_min", "sigma_max")


class TrainedTeacherParams(Section):
    """The edm family's teacher, trained from data by stages/edm/teacher.py."""

    steps: int = Field(1200, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, lt=1)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    channels: list[int] | None = None  # None: chosen from the resolution
    layers_per_block: int = Field(1, gt=0)
    checkpoint_every: int = Field(200, ge=0)  # training steps between resumable checkpoints; 0 = none
    edm: EDMParams = EDMParams()
    family: Literal["edm"] = "edm"

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v is not None and (not v or any(c <= 0 or c % 8 for c in v)):
            raise ValueError(f"must be a non-empty list of positive multiples of 8, got {v}")
        return v


# --- the text-to-image families' own stages: a pretrained teacher, prompts, encode cache, benchmark ------


class MiniVaeParams(Section):
    """The mini teacher's AutoencoderKL, trained first on the upsampled real images (stages/t2i/mini_vae.py)."""

    channels: list[int] = [32, 64]     # block widths; the VAE downsamples by 2 ** (len - 1)
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)  # SD's VAE: a KL term small beside the reconstruction


class MiniTeacherParams(Section):
    """A mini teacher of the family's own architecture, trained here on `data.source` captioned
    `a handwritten digit k` (the *-digits pipelines; stages/t2i/mini_teacher.py writes it at teacher.path)."""

    resolution: int = Field(16, ge=8)   # image side: the data upsampled to it
    vae: MiniVaeParams = MiniVaeParams()
    width: int = Field(32, gt=0, multiple_of=32)  # UNet: block widths (width, 2 width); transformer: its width
    depth: int = Field(1, gt=0)         # UNet: layers a block; transformer: joint blocks
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, lt=1)  # trained on the pipeline's negative branch, for CFG
    checkpoint_every: int = Field(500, ge=0)
    sampling_steps: int = Field(25, gt=0)  # the recommended call written to teacher/fewstep.json
    guidance: float = Field(4.0, ge=0)


class PretrainedTeacherParams(Section):
    """A text-to-image teacher: a local diffusers pipeline directory of the family's layout (fewstep/families/t2i/variants.py)."""

    path: str                                # a local diffusers pipeline directory (or a hub id, network permitting)
    family: Family = "sdxl"                  # edm never lands here (the teacher section's discriminator)
    mini: MiniTeacherParams | None = None    # set: the teacher at `path` is trained here from data (*-digits)


def teacher_kind(value: Any) -> str:
    """Which teacher section this is: a pretrained one names a text-to-image family or a path."""
    if isinstance(value, BaseModel):
        return "pretrained" if isinstance(value, PretrainedTeacherParams) else "trained"
    family = value.get("family") if isinstance(value, dict) else None
    if family is None:
        return "pretrained" if isinstance(value, dict) and "path" in value else "trained"
    return "trained" if family == "edm" else "pretrained"


#: the tags of the teacher section's two shapes; not part of a key's dotted name
TEACHER_SHAPES = {"trained": TrainedTeacherParams, "pretrained": PretrainedTeacherParams}
TeacherParams = Annotated[Union[Annotated[TrainedTeacherParams, Tag("trained")],
                                Annotated[PretrainedTeacherParams, Tag("pretrained")]], Discriminator(teacher_kind)]


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


class BenchmarkParams(Section):
    """DMD2's text-to-image protocol on local caption/image pairs (fewstep.families.t2i.benchmark); off while source is unset."""

    source: InputPath = None         # an imagefolder (images + metadata.jsonl: file_name, text) or a save_to_disk dataset
    text_column: str = "text"
    image_column: str = "image"
    count: int = Field(0, ge=0)      # pairs drawn by a seeded shuffle; 0 = all (DMD2: 10k COCO-2014 for SDXL, 30k for SD1.5)
    resolution: int = Field(512, gt=0)  # both image sets are resized to this before the featurizer (DMD2: 512 / 256)
    featurizer: InputPath = None     # FID's network: the FID Inception (inception-2015-12-05.pt, TorchScript), a .pt2, ...
    clip_path: InputPath = None      # a local CLIP model directory (transformers CLIPModel) for the CLIP score
    teacher: bool = True             # also sample the teacher (trajectories' steps and guidance) on every caption
    batch_size: int = Field(8, gt=0)  # also the batch at which latency is timed (median over the batches)
    seeds: int = Field(1, gt=0)      # sampling seeds: each a fresh image per caption; >= 2 gives FID/KID 95% intervals
    grid_size: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _something_to_score(self):
        if self.source and not (self.featurizer or self.clip_path):
            raise ValueError("source is set but neither featurizer nor clip_path: nothing to score")
        return self


# --- the shared stages: trajectories, critic, distill, finetune, evaluate ---------------------------------


class TrajectoriesParams(Section):
    """The teacher's ODE solves (stages/trajectories.py)."""

    num_samples: int = Field(2000, gt=0)   # teacher samples of the train split (conditions in turn)
    sampling_steps: int = Field(18, gt=0)  # EDM Heun steps; NFE = 2 * steps - 1 (twice that under CFG)
    guidance: float = Field(1.0, ge=0)     # CFG scale of the teacher (1: no guidance)
    batch_size: int = Field(500, gt=0)
    shard_size: int = Field(1000, gt=0)
    keep_states: bool = True               # also store every ODE state (steps + 1 per sample: consistency)
    eval_per_prompt: int = only(TEXT_TO_IMAGE, 1, gt=0)  # teacher samples per held-out prompt (evaluation's pairs)


class GanParams(Section):
    generator_weight: float = Field(3e-3, ge=0)
    critic_weight: float = Field(1e-2, ge=0)
    # the GAN head's own noise range, in distill.t_min/t_max's terms, with a fake-score pass of its own (e.g. low
    # noise, where a pixel-level artifact is still visible); null: DMD2's, the distribution-matching pass's
    # noise level and features
    t_min: float | None = Field(None, ge=0)
    t_max: float | None = Field(None, gt=0)
    # the fake score's features the head classifies: the UNet's bottleneck (DMD2) or its decoder's last block (full
    # resolution); the critic stage makes the head, so critic.gan.features and distill.dmd2.gan.features agree
    features: Literal["bottleneck", "decoder"] = "bottleneck"

    @model_validator(mode="after")
    def _own_range(self):
        if (self.t_min is None) != (self.t_max is None):
            raise ValueError("t_min and t_max are set together (the GAN head's own noise range) or both null")
        if self.t_min is not None and self.t_min >= self.t_max:
            raise ValueError(f"t_min must be < t_max, got {self.t_min} >= {self.t_max}")
        return self


class OptimParams(Section):
    lr: float = Field(2e-4, gt=0)
    betas: Pair = (0.0, 0.99)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    warmup_steps: int = Field(0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"must be two numbers in [0, 1), got {list(v)}")
        return v


# --- one params subsection per objective (fewstep/core/objectives/<name>.py) ---------------------------------


class DMD2Params(Section):
    ttur: int = Field(3, gt=0)  # fake-score updates per generator update
    gan: GanParams = GanParams()


class DMDParams(Section):
    regression_weight: float = Field(0.25, ge=0)  # DMD1's lambda_reg on the teacher's ODE pairs


class SiDParams(Section):
    alpha: float = Field(1.2, ge=0)  # SiD's alpha; 1.2 is the paper's choice
    ttur: int = Field(1, gt=0)


class ConsistencyParams(Section):
    huber_c: float | None = Field(None, gt=0)  # pseudo-Huber c; null = 0.00054 * sqrt(dimension) (iCT)


class TrainLoopParams(OptimParams):
    """Knobs of the one trainer, shared by every objective."""
    steps: int = Field(400, gt=0)
    batch_size: int = Field(64, gt=0)  # the global batch: divided over run.launcher's processes
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer update (effective batch = batch_size * grad_accum)
    ema_decay: float = Field(0.99, ge=0, lt=1)  # 0: no EMA copy is kept
    ema_warmup: bool = True  # diffusers' warm-up, decay min(ema_decay, (1+n)/(10+n)) at update n; false: ema_decay throughout
    checkpoint_every: int = Field(50, ge=0)  # training steps between resumable checkpoints; 0 = none
    log_every: int = Field(10, gt=0)


class CriticParams(TrainLoopParams):
    steps: int = Field(100, gt=0)
    gan: GanParams = GanParams()


class LoraParams(Section):
    rank: int = Field(0, ge=0)  # 0: train the full student network; > 0: a LoRA student of this rank (peft)
    alpha: float | None = Field(None, gt=0)  # LoRA scale numerator; null = rank
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class DistillParams(TrainLoopParams):
    objective: Literal["dmd2", "dmd", "sid", "consistency"] = "dmd2"
    student_steps: int | None = None  # null: as many as the student's listed noise levels, else 1
    # the student's conditioning noise levels, in the family's terms; null: student_steps evenly spaced
    student_sigmas: list[float] | None = only(EDM)           # sigmas; null: over the Karras grid
    student_timesteps: list[int] | None = only(TEXT_TO_IMAGE)  # DDPM timesteps; null: 999, 999 - 1000/k, ...
    backward_simulation: bool = True  # multi-step: the student's input at step k comes from its own steps < k
    simulate_with: Literal["student", "ema"] = "student"  # weights that run those earlier steps
    per_step_critic: bool = only(EDM, False)  # multi-step: the fake score / GAN head condition on the step that made a sample
    steps_per_batch: Literal["one", "all"] = "one"  # multi-step: one random step per batch (DMD2) | all, split evenly
    init_student: str | None = None  # a saved student of this teacher to start from (e.g. a 1-step one); null = the teacher
    real_guidance: float = Field(1.0, ge=0)  # CFG on the real (teacher) score; 1 = none
    # the DM / fake-score noise range as positions on the teacher's noise schedule, in every family: 0 = its
    # noisiest level, 1 = its cleanest (edm: the Karras grid, sigma_max..sigma_min; text-to-image: DDPM timestep
    # (1 - position) x 1000, so DMD2's 0.02..0.98 is timesteps 20..980)
    t_min: float = Field(0.02, ge=0)
    t_max: float = Field(0.98, gt=0)
    # [t_min, t_max] at the last step, the range moving linearly from [t_min, t_max] at the first; null: fixed
    t_range_end: Pair | None = None
    eval_every: int = only(EDM, 0, ge=0)  # quality curve: score the EMA student every N steps; 0 = off
    eval_samples: int = only(EDM, 500, gt=1)  # images per curve point (KID-T vs the teacher, FID vs held-out)
    lora: LoraParams = only(TEXT_TO_IMAGE, LoraParams())
    dmd2: DMD2Params = DMD2Params()
    dmd: DMDParams = DMDParams()
    sid: SiDParams = SiDParams()
    consistency: ConsistencyParams = ConsistencyParams()

    _t_range = ordered("t_min", "t_max")

    @field_validator("student_steps")
    @classmethod
    def _steps(cls, v):
        if v is not None and v not in (1, 2, 4):
            raise ValueError(f"must be 1, 2 or 4, got {v}")
        return v

    @field_validator("student_sigmas", "student_timesteps")
    @classmethod
    def _levels(cls, v, info):
        in_range = (lambda s: s > 0) if info.field_name == "student_sigmas" else (lambda t: 0 <= t <= 999)
        if v is not None and (not v or not all(map(in_range, v)) or any(a <= b for a, b in zip(v, v[1:]))):
            raise ValueError(f"must be a non-empty, strictly decreasing list of {_LEVELS[info.field_name]}, got {v}")
        return v

    @model_validator(mode="after")
    def _step_count(self):
        levels = self.student_sigmas if self.student_sigmas is not None else self.student_timesteps
        name = "student_sigmas" if self.student_sigmas is not None else "student_timesteps"
        if self.student_steps is None:
            self.student_steps = len(levels) if levels is not None else 1
        elif levels is not None and len(levels) != self.student_steps:
            raise ValueError(f"{name} must have student_steps ({self.student_steps}) entries, got {len(levels)}")
        return self


_LEVELS = {"student_sigmas": "positive noise levels", "student_timesteps": "timesteps in [0, 999]"}


class FinetuneParams(DistillParams):
    steps: int = Field(100, gt=0)
    lr: float = Field(5e-5, gt=0)

    @field_validator("init_student")
    @classmethod
    def _continues(cls, v):
        if v is not None:
            raise ValueError("must be null: finetune continues the distilled student")
        return v


class FidParams(Section):
    featurizer: InputPath = None  # .pt2 / TorchScript (images in [-1, 1] -> features; or the FID Inception) or a fewstep featurizer dir
    reference: InputPath = None   # a folder of reference images (searched recursively)


class JudgeParams(Section):
    """A mini teacher's pipeline judged through plain diffusers (stages/t2i/judge.py): the teacher and the exported
    student at their recommended calls, each image classified by prepare's featurizer."""

    by: list[str] = []                 # [the prepare folder whose classifier and held-out images judge]; [] = no judge
    per_class: int = Field(40, gt=0)   # images of each digit, per seed
    seeds: int = Field(3, gt=0)        # generation seeds; scores are averaged with 95% t-intervals
    batch_size: int = Field(100, gt=0)  # also the batch at which latency is timed
    grid_size: int = Field(10, gt=0)


    @field_validator("by")
    @classmethod
    def _one(cls, v):
        if len(v) > 1:
            raise ValueError(f"must name at most one prepare folder, got {v}")
        return v


class EvaluateParams(Section):
    seeds: int = Field(3, gt=0)  # sampling seeds; FID and friends are averaged over them
    batch_size: int = Field(250, gt=0)  # also the batch at which latency is timed (median over the batches)
    grid_size: int = Field(10, gt=0)
    knn_k: int = only(EDM, 3, gt=0)  # precision / recall neighbourhoods in the classifier's features
    floor_splits: int = only(EDM, 20, gt=0)  # random halvings of the held-out images that the floor averages
    clip_path: InputPath = only(TEXT_TO_IMAGE)  # a local CLIP model directory: enables the CLIP score
    fid: FidParams = only(TEXT_TO_IMAGE, FidParams())  # FID against your own reference images


#: Where a text-to-image pipeline's params start (GPU-sized; DMD2's SDXL recipe), under what it states.
