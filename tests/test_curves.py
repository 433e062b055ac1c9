"""Quality curves during training: scored on the EMA weights at the planned steps, without touching training."""
import copy

import torch

from fewstep.core import distillation
from toy import moment_error, student_points, toy_setup


def _train(tmp_path, eval_every, curve=None):
    setup = toy_setup("dmd2", ema_decay=0.9, steps=25, eval_every=eval_every, log_every=5)
    distillation.fit(setup, setup.params, tmp_path, "toy", curve=curve)
    return setup


def test_curve_scores_the_ema_weights_at_its_steps_and_leaves_training_unchanged(tmp_path):
    plain = _train(tmp_path / "plain", eval_every=0)
    seen = []

    def curve(student):
        seen.append(copy.deepcopy(student.state_dict()))
        return {"moment_error": moment_error(student_points(type("S", (), {"student": student,
                                                                            "student_sigmas": [80.0]}))),
                "calls": float(len(seen))}

    scored = _train(tmp_path / "scored", eval_every=10, curve=curve)
    for a, b in zip(plain.student.parameters(), scored.student.parameters()):
        assert torch.equal(a, b)  # training drew nothing from the probe, and the raw weights came back intact
    rows = (tmp_path / "scored/live/plots/metrics/quality/calls.tsv").read_text().splitlines()
    assert rows == ["step\tcalls", "0\t1.0", "10\t2.0", "20\t3.0", "25\t4.0"]
    assert (tmp_path / "scored/live/plots/metrics/quality/moment_error.tsv").is_file()
    # the last point saw the EMA weights the run ends with (fit copies them into the student), not the raw ones
    assert all(torch.equal(seen[-1][k], v) for k, v in scored.student.state_dict().items())
    assert not (tmp_path / "plain/live/plots/metrics/quality").exists()
