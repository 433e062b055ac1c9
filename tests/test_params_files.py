"""The shipped params files: valid, and already in the form DVC's YAML writer produces, so the documented
`dvc exp run -S key=value` changes exactly the value it sets (no reformatting in the diff)."""
import shutil
from pathlib import Path

import pytest

from fewstep.params import Params, load
from fewstep.sd.params import SDParams

ROOT = Path(__file__).resolve().parents[1]
FILES = {"params.yaml": Params, "pipelines/sdxl/params.yaml": SDParams, "pipelines/sd15/params.yaml": SDParams,
         "pipelines/sd3/params.yaml": SDParams}


@pytest.mark.parametrize("rel", FILES)
def test_a_dvc_params_edit_changes_one_line(rel, tmp_path):
    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / rel, copy)
    load(copy, FILES[rel])
    before = copy.read_text().splitlines()
    with modify_yaml(copy) as params:
        params["distill"]["lr"] = 0.125
    after = copy.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1, changed
    assert changed[0][1].strip().startswith("lr: 0.125")
