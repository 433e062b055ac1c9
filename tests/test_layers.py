"""The three layers as the folders show them, checked on the code itself: the pipeline machinery imports no torch,
the core and data no family (nor each other), no family another, and no pipeline's stage lists another family's files in its deps (an edit
to one family's code must never rerun, or invalidate the cache of, another family's GPU stages)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from fewstep.pipeline.deps import _imported_names, closure, pipeline_files, stage_deps

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ROOT / "fewstep" / "families"
ML_MODULES = {"torch", "diffusers", "transformers", "torchmetrics", "safetensors", "peft", "accelerate"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / "fewstep" / folder).rglob("*.py"))


def _family_of(rel: str) -> str | None:
    parts = Path(rel).parts
    return parts[2] if parts[:2] == ("fewstep", "families") and len(parts) > 3 else None


def _pipeline_family(dvcfile: str) -> str:
    """The root dvc.yaml is the EDM default; every pipeline under pipelines/ (their *-digits minis included)
    is a text-to-image one."""
    return "edm" if dvcfile == "dvc.yaml" else "t2i"


def test_the_families_are_the_edm_unet_and_the_text_to_image_teachers():
    assert sorted(p.name for p in FAMILIES.iterdir() if (p / "__init__.py").is_file()) == ["edm", "t2i"]


def test_no_stage_lists_another_familys_files():
    foreign, stages = [], 0
    for dvcfile in pipeline_files(ROOT):
        for stage in stage_deps(dvcfile, ROOT):
            stages += 1
            own = _pipeline_family(stage.dvcfile)
            others = sorted(f for f in stage.covered(ROOT) if _family_of(f) not in (None, own))
            foreign += [f"{stage.dvcfile}:{stage.stage} lists {f}" for f in others]
    assert stages >= 20  # the default's 7, sdxl's 10 and the mini teachers' 4
    assert not foreign, "\n".join(foreign)


def test_the_core_and_data_import_no_family_nor_each_other_and_no_family_imports_another():
    crossings = []
    for layer in ("core", "data"):
        for module in _modules(layer):
            crossings += [f"{module.relative_to(ROOT)} imports {f}" for f in closure(module, ROOT).files
                          if _family_of(f) or f.startswith(f"fewstep/{'data' if layer == 'core' else 'core'}/")]
    for module in FAMILIES.rglob("*.py"):
        own = _family_of(module.relative_to(ROOT).as_posix())
        crossings += [f"{module.relative_to(ROOT)} imports {f}" for f in closure(module, ROOT).files
                      if _family_of(f) not in (None, own)]
    assert not crossings, "\n".join(crossings)


def test_the_pipeline_machinery_imports_no_ml_module():
    heavy = []
    for module in _modules("pipeline"):
        for rel in closure(module, ROOT).files:
            if not rel.startswith(("fewstep/pipeline/", "fewstep/params/")) and rel not in (
                    "fewstep/__init__.py", "fewstep/errors.py", "fewstep/files.py"):
                heavy.append(f"{module.relative_to(ROOT)} reaches {rel}")
            names = {name.split(".")[0] for name, _ in _imported_names(ROOT / rel, ROOT)}
            heavy += [f"{rel} imports {name}" for name in sorted(names & ML_MODULES)]
    assert not heavy, "\n".join(sorted(set(heavy)))


def test_module_names_are_unique_in_the_package():
    names = Counter(p.name for p in (ROOT / "fewstep").rglob("*.py") if p.name != "__init__.py")
    assert [name for name, n in names.items() if n > 1] == []
