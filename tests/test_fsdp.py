"""FSDP2 (`run.parallel: fsdp`) on CPU with gloo, 2 processes, tiny SD UNets: the same losses as one process at
the same global batch, half the trained state per rank, sharded checkpoints that resume bit-identically (and on
another number of ranks), whole diffusers models saved at the end."""
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

import sd_fixtures as sd

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
BENCH = [str(ROOT / "bench/memory.py"), "--worker", "--steps", "4", "--batch-size", "2"]


def _bench(folder: Path, name: str, *args: str, launcher=(sys.executable,)) -> dict:
    out = folder / f"{name}.json"
    proc = subprocess.run([*launcher, *BENCH, *args, "--out", str(out)], cwd=folder, env=sd.project_env(ROOT),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "sd3-tiny"])
def test_fsdp_steps_equal_one_process_at_the_same_global_batch_with_half_the_state(size, tmp_path):
    """2 FSDP ranks x 2 samples vs one process on the same 4 samples (2 micro-batches replaying the ranks'
    random streams): every critic and generator loss within 1e-4; each rank holds half the trained state
    (parameters, gradients, AdamW moments) that a DDP rank holds. For an SD UNet and for an SD3 transformer
    distilled as a rectified flow (fewstep.families.t2i.flow_denoiser, its GAN head on the middle block's tokens)."""
    one = _bench(tmp_path, "one", "--size", size, "--parallel", "ddp", "--virtual-ranks", "2")
    ddp = _bench(tmp_path, "ddp", "--size", size, "--parallel", "ddp", launcher=TORCHRUN)
    fsdp = _bench(tmp_path, "fsdp", "--size", size, "--parallel", "fsdp", launcher=TORCHRUN)
    for phase in ("critic", "generator"):
        assert len(fsdp["losses"][phase]) == 4
        assert fsdp["losses"][phase] == pytest.approx(one["losses"][phase], rel=1e-4)
        assert ddp["losses"][phase] == pytest.approx(one["losses"][phase], rel=1e-4)
    assert ddp["trained_mb_per_rank"] == pytest.approx(one["trained_mb_per_rank"], rel=1e-6)  # whole copies
    assert fsdp["trained_mb_per_rank"] / ddp["trained_mb_per_rank"] == pytest.approx(0.5, abs=0.02)


# --- the SD stages under torchrun with run.parallel: fsdp ----------------------------------------------------

ARGS = ["--encode", "encode", "--trajectories", "trajectories", "--critic", "critic/critic"]


def _stage(folder: Path, name: str, *args: str, launcher=TORCHRUN, params="params.yaml", env=None,
           check=True) -> subprocess.CompletedProcess:
    cmd = [*launcher, *sd.stage_script(name), "--params", params, *args]
    proc = subprocess.run(cmd, cwd=folder, env={**sd.project_env(ROOT), **(env or {})}, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Encode and trajectories of a tiny SDXL teacher; the critic already trained by 2 FSDP ranks."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fsdp")
    teacher = sd.tiny_sdxl(folder / "tiny-sdxl")
    params = sd.sd_params("sdxl", teacher={"path": str(teacher)},
                          prompts={"source": str(sd.write_prompt_dataset(folder / "ds")), "text_column": "caption",
                                   "image_column": "image"},
                          run={"parallel": "fsdp", "num_threads": 1},
                          distill={"steps": 8, "checkpoint_every": 2, "batch_size": 4, "lr": 1e-4})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    _stage(folder, "encode", "--out", "encode", launcher=(sys.executable,))
    _stage(folder, "trajectories", "--encode", "encode", "--out", "trajectories", launcher=(sys.executable,))
    out = _stage(folder, "critic", "--encode", "encode", "--trajectories", "trajectories", "--out", "critic")
    assert "parallel: fsdp on 2 process(es)" in out.stdout
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part}/{key}": value for part in ("student/unet/diffusion_pytorch_model.safetensors",
                                                "critic/unet/diffusion_pytorch_model.safetensors",
                                                "critic/gan_head.safetensors")
            for key, value in load_file(folder / part).items()}


def _kill_at(folder: Path, checkpoints: Path, step: int, out: str) -> None:
    """Start 2 FSDP ranks; SIGKILL torchrun and both ranks once the sharded checkpoint reaches `step`."""
    states = lambda: list(checkpoints.glob("*-distill/state.json"))  # <pipeline>-distill
    proc = subprocess.Popen([*TORCHRUN, *sd.stage_script("distill"), "--params", "params.yaml", *ARGS,
                             "--out", out], cwd=folder, env={**sd.project_env(ROOT), "FEWSTEP_CHECKPOINT_DIR": str(checkpoints)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(states()[0].read_text())["step"] >= step:
                break
        except (IndexError, FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "distill finished before it could be killed"
    # torchrun starts each rank in a session of its own: kill them by the process tree, not the group
    torchrun = psutil.Process(proc.pid)
    tree = [torchrun, *torchrun.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.slow
def test_fsdp_sigkill_resume_is_identical_and_resumes_on_one_rank(project, tmp_path):
    """Uninterrupted vs killed at step 4 of 8 and rerun (2 ranks): the same bytes. The same checkpoint resumed
    by one process reshards and finishes; the saved student is a plain diffusers UNet, exported as a pipeline."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    _stage(project, "distill", *ARGS, "--out", "distill-whole", env={"FEWSTEP_CHECKPOINT_DIR": str(tmp_path / "a")})
    checkpoints = tmp_path / "b"
    _kill_at(project, checkpoints, 4, "distill-killed")
    assert not (project / "distill-killed").exists(), "a killed stage left a half-written output"
    (saved,) = checkpoints.glob("*-distill")
    assert sorted(p.name for p in saved.iterdir()) == ["logs", "rank0.safetensors", "rank1.safetensors", "shards",
                                                        "state.json"]
    assert not list(saved.rglob("*.metadata")) and not list(saved.rglob("*.pt")), "no pickles in a checkpoint"
    shutil.copytree(checkpoints, tmp_path / "c")

    rerun = _stage(project, "distill", *ARGS, "--out", "distill-killed", env={"FEWSTEP_CHECKPOINT_DIR": str(checkpoints)})
    assert "saved by 2 rank(s), now 2" in rerun.stdout
    whole, resumed = _weights(project / "distill-whole"), _weights(project / "distill-killed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not saved.exists(), "a finished run removes its checkpoint"

    alone = _stage(project, "distill", *ARGS, "--out", "distill-one-rank", launcher=(sys.executable,),
                   env={"FEWSTEP_CHECKPOINT_DIR": str(tmp_path / "c")})
    assert "saved by 2 rank(s), now 1; random streams reseeded" in alone.stdout
    rows = (project / "distill-one-rank/live/plots/metrics/generator/loss.tsv").read_text().split("\n")[1:]
    assert [int(row.split("\t")[0]) for row in rows if row] == list(range(1, 9))  # steps 1-4 kept from the logs
    unet = UNet2DConditionModel.from_pretrained(project / "distill-one-rank/student/unet")
    assert not any("lora" in key or "_fsdp" in key for key in unet.state_dict())
    # the export stage makes it the deliverable: a diffusers pipeline that loads and samples in 4 steps
    _stage(project, "export", "--student", "distill-one-rank/student", "--out", "export", launcher=(sys.executable,))
    pipe = StableDiffusionXLPipeline.from_pretrained(project / "export")
    latents = pipe("a red square", num_inference_steps=4, guidance_scale=0.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_fsdp_lora_student_trains_adapters_and_saves_merged(project):
    from diffusers import UNet2DConditionModel

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"].update(lora={"rank": 4, "alpha": None, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
                             checkpoint_every=0, steps=3)
    (project / "params-lora.yaml").write_text(yaml.safe_dump(params))
    out = _stage(project, "distill", *ARGS, "--out", "distill-lora", params="params-lora.yaml")
    assert "lora rank 4" in out.stdout and "parallel: fsdp on 2 process(es)" in out.stdout
    merged = UNet2DConditionModel.from_pretrained(project / "distill-lora/student/unet")
    teacher = UNet2DConditionModel.from_pretrained(project / "tiny-sdxl/unet")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed), changed[:5]
