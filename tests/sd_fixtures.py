"""Tiny Stable Diffusion pipelines (SDXL, SD1.5 and SD3 layouts) built from configs with random weights.

Everything is written locally — tokenizer files included — so nothing is downloaded. The shapes follow
diffusers' own pipeline tests: a two-level UNet on 8x8 latents, a two-level VAE (16x16 images), CLIP
text encoders with 32-wide hidden states over a 600-token byte-level BPE vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

PROMPTS = ["a red square", "a blue circle", "a green triangle on white", "two yellow dots",
           "a purple line", "an orange square at night", "a small grey dot", "a red and blue stripe"]


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", max_length: int = 77) -> Path:
    """A CLIP BPE tokenizer directory: every byte and byte+</w> as tokens plus a few merges."""
    from fewstep.families.t2i.mini import clip_tokenizer

    merges = ["r e", "e d</w>", "a r", "o n</w>", "s q", "u a", "i n", "t h", "th e</w>", "c i"]
    clip_tokenizer(folder, pad_token=pad_token, max_length=max_length, merges=merges)
    return folder


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
                          hidden_act="gelu", **extra)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=16)


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, **extra)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1)


def tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline directory with random weights (two text encoders, pooled + time ids)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    pipe = StableDiffusionXLPipeline(
        unet=_unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 1)),
        vae=_vae(), scheduler=_scheduler(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        tokenizer=_load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok")),
        tokenizer_2=_load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok2", pad_token="!")),
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline directory with random weights (one text encoder, no safety checker)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        unet=_unet(cross_attention_dim=32), vae=_vae(), scheduler=_scheduler(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=_load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


T5_WORDS = sorted({word for prompt in PROMPTS for word in prompt.split()})


def tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline directory with random weights: a two-block SD3 transformer on 8x8 latents, two
    CLIP encoders with projections (pooled = both, 64 wide), a two-layer T5 encoder (64 wide, a word-level
    Unigram vocabulary of the test prompts), a shifted flow-matching scheduler and a VAE that shifts and scales
    its latents as SD3's does."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    folder = Path(folder)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.0609, scaling_factor=1.5305,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                          caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(T5_WORDS) + 4, d_model=64, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=2)),
        tokenizer=_load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok")),
        tokenizer_2=_load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok2", pad_token="!")),
        tokenizer_3=T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                                    + [("\u2581" + w, -1.0) for w in T5_WORDS], extra_ids=0),
    )
    pipe.save_pretrained(folder)
    return folder


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


TRAINING_STAGES = ("critic", "distill", "finetune")  # shared by every family: stages/<name>.py + the trainer


def stage_script(name: str, root: Path | None = None) -> list[str]:
    """A text-to-image stage's command start: stages/t2i/<name>.py, or for a shared stage stages/<name>.py with
    the text-to-image trainer or teacher-solve module (as pipelines/sdxl/dvc.yaml runs them)."""
    root = Path(root or ROOT)
    if name in TRAINING_STAGES:
        return [str(root / f"stages/{name}.py"), "--trainer", str(root / "fewstep/families/t2i/t2i_trainer.py")]
    family_modules = {"trajectories": "t2i_trajectories.py", "evaluate": "t2i_evaluation.py"}
    if name in family_modules:
        return [str(root / f"stages/{name}.py"), "--family", str(root / "fewstep/families/t2i" / family_modules[name])]
    return [str(root / f"stages/t2i/{name}.py")]


def write_prompt_file(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def write_prompt_dataset(folder: Path, prompts: list[str] = PROMPTS, size: int = 24) -> Path:
    """A `datasets` save_to_disk directory with a text column and an image column (flat colour fields)."""
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy())
              for _ in prompts]
    ds = Dataset.from_dict({"caption": list(prompts), "image": images},
                           features=Features({"caption": Value("string"), "image": ImageFeature()}))
    ds.save_to_disk(str(folder))
    return folder


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP model directory (CLIPModel + CLIPProcessor) with random weights, for the CLIP score."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=16, patch_size=4, projection_dim=32)
    config = CLIPConfig(text_config=_text_config(projection_dim=32).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    tokenizer = _load_tokenizer(write_tokenizer(folder.parent / f".{folder.name}-tok"))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_featurizer(path: Path, seed: int = 0) -> Path:
    """An image featurizer (images in [-1, 1] -> 16 features) saved with torch.export, the FID's feature network."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    program = torch.export.export(net, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


class _InceptionLike(torch.nn.Module):
    """The FID Inception's calling convention (inception-2015-12-05.pt): pixel values in [0, 255], any size,
    pool features only with return_features=True (logits otherwise). It refuses images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.logits = torch.nn.Linear(8, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        torch._assert(bool(img.max() > 1.5), "expects pixel values in [0, 255]")
        x = torch.nn.functional.interpolate(img / 127.5 - 1, size=(19, 19), mode="bilinear", align_corners=False)
        features = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.silu(self.conv(x)), 1).flatten(1)
        return features if return_features else self.logits(features)


def tiny_inception(path: Path, seed: int = 0) -> Path:
    """A TorchScript stand-in for the FID Inception (same interface, random weights, 8 features)."""
    torch.manual_seed(seed)
    torch.jit.script(_InceptionLike()).save(str(path))
    return path


def write_caption_folder(folder: Path, count: int = 10, size: int = 20) -> Path:
    """A local text-to-image benchmark as `datasets` imagefolder reads it: images + metadata.jsonl."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    lines = []
    for i in range(count):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        pixels = np.broadcast_to(colour, (size, size + 4, 3)).copy()
        pixels[: size // 2] //= 2
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"{PROMPTS[i % len(PROMPTS)]}, picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_image_folder(folder: Path, count: int = 12, size: int = 24) -> Path:
    """Reference images for the FID: flat colour fields as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


# --- a temporary git + DVC project holding pipelines/<name> with a tiny teacher ------------------------

ROOT = Path(__file__).resolve().parents[1]

# Every SD stage's real code path in seconds; one thread, since parallel test jobs share the cores.
SD_TINY = {
    "run": {"device": "cpu", "precision": "fp32", "num_threads": 1, "gradient_checkpointing": False},
    "prompts": {"eval_count": 2},
    "encode": {"batch_size": 8, "shard_size": 4, "dtype": "fp32"},
    "trajectories": {"num_samples": 6, "eval_per_prompt": 2, "sampling_steps": 3, "batch_size": 4, "shard_size": 4},
    "critic": {"steps": 2, "batch_size": 2, "log_every": 1},
    "distill": {"steps": 2, "batch_size": 2, "log_every": 1, "warmup_steps": 0, "dmd2": {"ttur": 1}},
    "finetune": {"steps": 2, "batch_size": 2, "log_every": 1, "dmd2": {"ttur": 1}},
    "evaluate": {"batch_size": 4, "grid_size": 2},
}


def sd_params(name: str, **sections) -> dict:
    """pipelines/<name>/params.yaml shrunk by SD_TINY, then per-section overrides (nested dicts merge)."""
    import yaml

    from conftest import _merge

    params = yaml.safe_load((ROOT / "pipelines" / name / "params.yaml").read_text())
    return _merge(_merge(params, yaml.safe_load(yaml.safe_dump(SD_TINY))), sections)


def make_sd_project(folder: Path, name: str, params: dict, teacher: Path, prompts: Path) -> Path:
    """A fresh git + DVC repo with the library, stage scripts, flows and pipelines/<name>; the teacher
    is copied to models/<its name> and the prompt source to data/<its name>, as a user would lay them out."""
    import shutil

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ("fewstep", "stages", "flows"):
        shutil.copytree(ROOT / item, folder / item, ignore=ignore)
    for item in (".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(ROOT / item, folder / item)
    (folder / "pipelines").mkdir()
    shutil.copytree(ROOT / "pipelines" / name, folder / "pipelines" / name,
                    ignore=shutil.ignore_patterns("dvc.lock", "tmp", "cache", "config.local", "encode", "trajectories", "critic",
                                                  "distill", "finetune", "export", "evaluate",
                                                  "benchmark", "inputs"))
    (folder / "models").mkdir()
    shutil.copytree(teacher, folder / "models" / teacher.name)
    (folder / "data").mkdir()
    copy = shutil.copytree if prompts.is_dir() else shutil.copy
    copy(prompts, folder / "data" / prompts.name)
    params = {**params, "teacher": {**params["teacher"], "path": f"models/{teacher.name}"},
              "prompts": {**params["prompts"], "source": f"data/{prompts.name}"}}
    (folder / "pipelines" / name / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, folder)
    return folder


def project_env(project: Path) -> dict:
    """The test environment with the project itself first on the import path, so its stages run the
    project's copy of fewstep whatever checkout the venv's editable install points at."""
    import os

    from conftest import env

    e = env()
    project = next(p for p in (Path(project).resolve(), *Path(project).resolve().parents) if (p / "fewstep").is_dir())
    e["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [e.get("PYTHONPATH")])])
    return e


def run(cmd: list[str], cwd: Path, check: bool = True):
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=project_env(cwd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def teacher_scheduler_config(path: Path) -> dict:
    return json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())


def with_time_ids(negative, cond):
    """The negative-prompt conditioning as `guided` builds it: the sample's own SDXL time ids."""
    from fewstep.families.t2i.sd_denoiser import SDCond

    return SDCond(negative.embeds, negative.pooled, cond.time_ids)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Built once: tiny SDXL, SD1.5 and SD3 teachers, prompt sources, a CLIP model, an FID featurizer."""
    import torch

    torch.set_num_threads(1)  # in-process generation below; parallel test jobs share the cores
    root = tmp_path_factory.mktemp("sd-assets")
    return {"sdxl": tiny_sdxl(root / "tiny-sdxl"), "sd15": tiny_sd15(root / "tiny-sd15"), "sd3": tiny_sd3(root / "tiny-sd3"),
            "dataset": write_prompt_dataset(root / "prompts-with-images"),
            "text": write_prompt_file(root / "prompts.txt"), "clip": tiny_clip(root / "clip"),
            "featurizer": tiny_featurizer(root / "featurizer.pt2"),
            "reference": write_image_folder(root / "reference"),
            "inception": tiny_inception(root / "inception.pt"), "captions": write_caption_folder(root / "coco-tiny")}


def sdxl_project(tmp_path: Path, assets: dict, name: str = "sdxl", **sections) -> Path:
    """The SDXL (or another family's) pipeline on a prompt dataset with images, CLIP score and FID configured, and
    the text-to-image benchmark on a tiny caption folder with an Inception stand-in."""
    benchmark = {"source": str(assets["captions"]), "featurizer": str(assets["inception"]), "clip_path": str(assets["clip"]),
                 "count": 0, "batch_size": 4, "seeds": 2, "grid_size": 2, **sections.pop("benchmark", {})}
    params = sd_params(name, **{"prompts": {"text_column": "caption", "image_column": "image"},
                                "evaluate": {"clip_path": str(assets["clip"]),
                                             "fid": {"featurizer": str(assets["featurizer"]),
                                                     "reference": str(assets["reference"])}},
                                "benchmark": benchmark, **sections})
    return make_sd_project(tmp_path / "project", name, params, assets[name], assets["dataset"])
