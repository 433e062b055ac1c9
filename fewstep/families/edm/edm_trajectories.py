"""The EDM family's teacher solves for stages/trajectories.py (`--family fewstep/families/edm/edm_trajectories.py`): a
class-conditional teacher trained from data (digits, image folders)."""
from __future__ import annotations

from fewstep.core import runtime
from fewstep.families.edm.unet import EDMDenoiser, load_model
from fewstep.core.sampling import TeacherSplit

INPUTS = {"teacher": "the teacher stage's model directory"}
launch = runtime.run  # start-up: params of the edm family, in the project root


def teacher_splits(params, args, device) -> tuple[EDMDenoiser, tuple[int, ...], list[TeacherSplit]]:
    """One `train` split, class labels in turn (balanced, in a grid-friendly order). Classes are not held out,
    so the evaluation reads this split as its teacher side."""
    teacher, _ = load_model(args.teacher, device)
    c, size = teacher.unet.config.in_channels, teacher.unet.config.sample_size
    split = TeacherSplit("train", params.trajectories.num_samples, teacher.num_classes,
                         conditions=lambda labels: labels, noise_stream="trajectories")
    return teacher, (c, size, size), [split]
