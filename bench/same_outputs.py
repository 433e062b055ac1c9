"""A refactor that must change no output, checked by running: each text-to-image digits pipeline with the test
suite's shrunk params (tests/test_digits_minis.py: DIGITS_TINY) from two commits, every stage's outputs compared by
the hashes in the resulting dvc.lock files. Wall-clock fields (latency_ms, speedup) are the only ones allowed to
differ; a metrics file that differs anywhere else is a failure. Writes bench/results/same_outputs.{json,md}.

    python bench/same_outputs.py OLD_REV                    # OLD_REV against the working tree, all three families
    python bench/same_outputs.py OLD_REV --new NEW_REV --families sdxl

About 90 s a family and commit on 2 cores. The default pipeline's own check is the fresh clone's `dvc repro` against
the committed dvc.lock (../shared/tools/fresh-clone-check).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _merge  # noqa: E402  the suite's params merge and shrunk params: one definition of "tiny"
from test_digits_minis import DIGITS_TINY  # noqa: E402

WALL_CLOCK = ("latency_ms", "speedup")
OUTPUTS = ("prepare", "captions", "vae", "teacher", "encode", "trajectories", "critic", "distill", "finetune",
           "export", "evaluate", "benchmark", "inputs", "judge")


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def tree_at(rev: str | None, dest: Path) -> Path:
    """The repository at `rev` (None: the working tree as it is; run_tiny copies what it needs)."""
    if rev is None:
        return ROOT
    sh(["git", "worktree", "add", "-q", "--detach", str(dest), rev], ROOT)
    return dest


def run_tiny(source: Path, family: str, work: Path) -> tuple[dict, Path, float]:
    """The family's digits pipeline, shrunk, in a fresh git + DVC repo built from `source`: {stage: {out: md5}}."""
    folder = work / family
    folder.mkdir(parents=True)
    for item in ("fewstep", "stages", "flows"):
        shutil.copytree(source / item, folder / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in (".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(source / item, folder / item)
    pipeline = folder / "pipelines" / f"{family}-digits"
    shutil.copytree(source / "pipelines" / f"{family}-digits", pipeline,
                    ignore=shutil.ignore_patterns("dvc.lock", "tmp", "cache", "config.local", *OUTPUTS))
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    (pipeline / "params.yaml").write_text(yaml.safe_dump(_merge(params, DIGITS_TINY), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(folder)}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "b@example.com"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"]):
        sh(cmd, folder, env)
    started = time.perf_counter()
    sh(["dvc", "repro"], pipeline, env)
    outs = {}
    for lock in (pipeline / "dvc.lock", pipeline / "mini" / "dvc.lock"):
        for stage, entry in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).items():
            outs[f"{lock.parent.name}:{stage}"] = {o["path"]: o.get("md5") for o in entry.get("outs", [])}
    return outs, pipeline, time.perf_counter() - started


def _flat(value, prefix: str = "") -> dict:
    """A JSON document as {dotted.key: leaf value}."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()}


def compare(family: str, old: tuple, new: tuple) -> dict:
    (old_outs, old_dir, _), (new_outs, new_dir, _) = old, new
    same, differ = 0, []
    for stage, outs in old_outs.items():
        for path, digest in outs.items():
            if new_outs.get(stage, {}).get(path) == digest:
                same += 1
                continue
            a, b = (_flat(json.loads((d / path).read_text())) if path.endswith(".json") else None
                    for d in (old_dir, new_dir))
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k)) if a else None
            differ.append({"output": path, "keys": keys,
                           "wall_clock_only": bool(keys) and all(k.endswith(WALL_CLOCK) for k in keys)})
    stages_match = sorted(old_outs) == sorted(new_outs)
    ok = stages_match and all(d["wall_clock_only"] for d in differ)
    return {"family": family, "outputs_identical": same, "outputs_differing": differ, "same_stages": stages_match,
            "ok": ok, "seconds": {"old": round(old[2], 1), "new": round(new[2], 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the commit before the change")
    ap.add_argument("--new", default=None, help="the commit after it (default: the working tree)")
    ap.add_argument("--families", nargs="+", default=["sdxl", "sd15", "sd3"], choices=["sdxl", "sd15", "sd3"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="same-outputs-") as tmp:
        tmp = Path(tmp)
        trees = {"old": tree_at(args.old, tmp / "old-tree"), "new": tree_at(args.new, tmp / "new-tree")}
        try:
            for family in args.families:
                runs = {side: run_tiny(tree, family, tmp / side) for side, tree in trees.items()}
                rows.append(compare(family, runs["old"], runs["new"]))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for side, rev in (("old", args.old), ("new", args.new)):
                if rev is not None:
                    subprocess.run(["git", "worktree", "remove", "--force", str(trees[side])], cwd=ROOT)
    result = {"old": args.old, "new": args.new or "working tree", "families": rows, "ok": all(r["ok"] for r in rows)}
    out = ROOT / "bench" / "results"
    (out / "same_outputs.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Same outputs: {result['old']} -> {result['new']}", "",
             "| family | outputs identical | differing (only wall-clock fields?) | ok |", "|---|---|---|---|"]
    for r in rows:
        differing = ", ".join(f"{d['output']} ({d['wall_clock_only']})" for d in r["outputs_differing"]) or "none"
        lines.append(f"| {r['family']} | {r['outputs_identical']} | {differing} | {r['ok']} |")
    (out / "same_outputs.md").write_text("\n".join(lines) + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
