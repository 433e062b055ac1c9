"""export: the deliverable — the teacher's diffusers pipeline with the student network and a scheduler that
replays the student's timesteps; `StableDiffusionXLPipeline.from_pretrained(out)` (StableDiffusionPipeline for
SD1.5, StableDiffusion3Pipeline for SD3) loads it and generates with num_inference_steps = the student's steps,
guidance_scale = 0 (out/fewstep.json holds the exact call)."""
from pathlib import Path

from fewstep.io import ArtifactError, read_json
from fewstep.files import atomic_output
from fewstep.families.t2i import export, teacher as teachers


def main(params, args, device):
    path = teachers.resolve(params.teacher.path, params.teacher.family)
    info = read_json(args.student / "fewstep.json")
    if info.get("role") != "student":
        raise ArtifactError(f"{args.student}: not a student model directory (role {info.get('role')!r})")
    network = teachers.load_network(args.student, params.teacher.family)
    with atomic_output(args.out) as out:
        export.export(path, params.teacher.family, network, info["student_timesteps"], out)
    print(f"[export] {params.teacher.family} pipeline, {len(info['student_timesteps'])} steps at "
          f"{info['student_timesteps']} -> {args.out}", flush=True)


def configure(ap):
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("export", main, configure)
