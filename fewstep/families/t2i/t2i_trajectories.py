"""The text-to-image families' teacher solves for stages/trajectories.py
(`--family fewstep/families/t2i/t2i_trajectories.py`): SDXL, SD1.5 and SD3 teachers on the encode stage's cached prompts."""
from __future__ import annotations

from fewstep.core import sampling
from fewstep.families.t2i import networks, teacher as teachers
from fewstep.families.t2i import launch as start_up
from fewstep.families.t2i.sd_denoiser import SDDenoiser
from fewstep.families.t2i.encoded import Encoded

INPUTS = {"encode": "the encode stage's output (cached text conditioning)"}
launch = start_up.run  # start-up: params of a text-to-image family, continued from the repository root


def teacher_splits(params, args, device) -> tuple[SDDenoiser, tuple[int, ...], list[sampling.TeacherSplit]]:
    """The train prompts in turn (trajectories.num_samples) and every held-out prompt eval_per_prompt times (the
    evaluation's teacher side), each split from its own noise stream."""
    p = params.trajectories
    path = teachers.resolve(params.teacher.path, params.teacher.family)
    train, held_out = Encoded.load(args.encode, "train"), Encoded.load(args.encode, "eval")
    teacher = networks.teacher_denoiser(path, train.negative, device, params.run.precision)
    splits = [sampling.TeacherSplit(name, count, len(encoded.texts), conditions=lambda index, e=encoded: e.cond[index],
                                    noise_stream=f"trajectories-{name}")
              for name, encoded, count in (("train", train, p.num_samples),
                                           ("eval", held_out, len(held_out.texts) * p.eval_per_prompt))]
    return teacher, tuple(train.index["latent_shape"]), splits
