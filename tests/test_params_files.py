"""The shipped params files: valid, and already in the form DVC's YAML writer produces, so the documented
`dvc exp run -S key=value` changes exactly the value it sets (no reformatting in the diff)."""
import shutil
from pathlib import Path

import pytest

from fewstep.params import load

ROOT = Path(__file__).resolve().parents[1]
FILES = {"params.yaml": "edm", "pipelines/sdxl/params.yaml": "sdxl", "pipelines/sd15/params.yaml": "sd15",
         "pipelines/sd3/params.yaml": "sd3"}


@pytest.mark.parametrize("rel", FILES)
def test_a_dvc_params_edit_changes_one_line(rel, tmp_path):
    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / rel, copy)
    assert load(copy).family == FILES[rel]
    before = copy.read_text().splitlines()
    with modify_yaml(copy) as params:
        params["distill"]["lr"] = 0.125
    after = copy.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1, changed
    assert changed[0][1].strip().startswith("lr: 0.125")
