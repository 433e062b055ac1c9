"""The shipped params files: valid, and already in the form DVC's YAML writer produces, so the documented
`dvc exp run -S key=value` changes exactly the values it sets (no reformatting in the diff)."""
import shutil
from pathlib import Path

import pytest

from fewstep.params import load

ROOT = Path(__file__).resolve().parents[1]
FILES = {"params.yaml": "edm", "pipelines/sdxl/params.yaml": "sdxl", "pipelines/sd15/params.yaml": "sd15",
         "pipelines/sd3/params.yaml": "sd3", "pipelines/sdxl-digits/params.yaml": "sdxl",
         "pipelines/sd15-digits/params.yaml": "sd15", "pipelines/sd3-digits/params.yaml": "sd3"}


@pytest.mark.parametrize("rel", FILES)
def test_newcomer_dvc_exp_run_set_changes_only_the_values_it_sets(rel, tmp_path):
    """`dvc exp run -S` goes through DVC's Hydra overrides, which rewrite every list they touch in block form:
    a list written `[a, b]` in params.yaml would turn into block lines in the diff of any -S run."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / rel, copy)
    assert load(copy).family == FILES[rel]
    before = copy.read_text().splitlines()
    apply_overrides(copy, ["distill.lr=0.125", "critic.betas=[0.5,0.9]"])
    after = copy.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after), "the form changed: " + "\n".join(after)
    assert sorted(b.strip() for _, b in changed) == ["- 0.5", "- 0.9", "lr: 0.125"], changed
    assert load(copy).distill.lr == 0.125 and load(copy).critic.betas == (0.5, 0.9)
