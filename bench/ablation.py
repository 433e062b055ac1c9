"""Ablation table: objectives, student step counts, backward simulation and learning rates compared at
one training budget, each variant scored by the evaluate stage (FIDs averaged over its sampling seeds).

    python bench/ablation.py [--variants bench/ablation.yaml] [--only NAME ...] [--jobs 1]
                             [--set run.device=cuda ...] [--base REV] [--table-only [--merge NAME ...]] [--rank]

Every variant is params.yaml plus the overrides listed in bench/ablation.yaml. It reuses this
workspace's prepare/teacher/trajectories outputs (run `dvc repro trajectories` first) and runs the
critic -> distill -> finetune -> evaluate commands of dvc.yaml in bench/.ablation/<variant>/.
This is what `dvc exp run --queue -S key=value ...` + `dvc exp run --run-all` does (see README), minus
DVC itself, so it also runs where only torch is installed (a GPU box). Results:
bench/results/ablation.{json,md}.

`--rank` also ranks the variants on both views at once (`rank_table`, results/<name>-rank.md): variants that
differ only in `seed` (training seeds) are one recipe, averaged. A recipe is its overrides, so merged
studies must share a base params.yaml (`--base REV` runs new seeds of a recipe measured before the default
changed). The rule, so each recipe change is chosen the same way: score = max(student FID / the upper end of
the teacher's FID interval, student pixel W1 / (1.2 x the teacher's)), each measured against the teacher of the same evaluate run. A score <= 1 meets both targets (FID
within or below the teacher's interval, W1 at most 1.2x); the lowest score wins; `front` marks the Pareto front
(no other recipe has both a lower FID and a lower W1), drawn in results/<name>-front.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".ablation"
RESULTS = ROOT / "bench" / "results"
SHARED = ("prepare", "teacher", "trajectories")  # upstream outputs no variant changes
STAGES = ("critic", "distill", "finetune", "evaluate")
CODE = hashlib.sha256(b"".join(p.read_bytes() for folder in ("fewstep", "stages")
                               for p in sorted((ROOT / folder).rglob("*.py")))).hexdigest()[:16]


def set_dotted(params: dict, dotted: str, value) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def parse_sets(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def stage_key(cmd: str, params: dict, upstream: list[str]) -> str:
    """What a finished stage of a variant was run with (command, params, code, upstream stages): a rerun of the
    tool skips the stage while this is unchanged."""
    text = json.dumps([cmd, params, upstream, CODE], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_params(rev: str | None) -> dict:
    """params.yaml of the working tree, or of a git revision (to add seeds to a recipe measured before the
    default changed: a recipe is its overrides, so they must apply to the same base)."""
    if rev is None:
        return yaml.safe_load((ROOT / "params.yaml").read_text())
    shown = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"bench/ablation.py: --base {rev}: no params.yaml at that revision ({shown.stderr.strip()})")
    return yaml.safe_load(shown.stdout)


def run_variant(name: str, overrides: dict, base_sets: dict, base: str | None = None) -> dict:
    """Run the downstream stages of one variant; returns its metrics and stage times."""
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    for shared in SHARED:
        link = folder / shared
        if not link.is_symlink():  # (a link to an upstream output not made yet is dangling, not absent)
            link.symlink_to(ROOT / shared)
    params = base_params(base)
    for dotted, value in {**base_sets, **overrides}.items():
        set_dotted(params, dotted, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    seconds, done_before = {}, []
    for stage in STAGES:
        cmd = stages[stage]["cmd"].replace("${run.launcher}", params["run"]["launcher"])
        cmd = cmd.replace("python stages/", f"{sys.executable} {ROOT}/stages/", 1)
        cmd = re.sub(r"(--(?:trainer|family) )fewstep/", rf"\g<1>{ROOT}/fewstep/", cmd)  # the family's modules
        done = folder / f".done-{stage}"
        key = stage_key(cmd, params, done_before)
        finished = json.loads(done.read_text()) if done.exists() else {}
        if finished.get("key") == key:  # finished earlier with these params
            seconds[stage] = finished["seconds"]
            done_before.append(key)
            continue
        start = time.perf_counter()
        with open(folder / f"{stage}.log", "w") as log:
            proc = subprocess.run(cmd, shell=True, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds[stage] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            tail = (folder / f"{stage}.log").read_text().strip().splitlines()[-1:]
            print(f"[ablation] {name}: {stage} failed: {tail}", flush=True)
            return {"variant": name, "overrides": overrides, "failed": stage, "seconds": seconds}
        done.write_text(json.dumps({"key": key, "seconds": seconds[stage]}))
        done_before.append(key)
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    print(f"[ablation] {name}: done in {sum(seconds.values()):.0f} s", flush=True)
    return {"variant": name, "overrides": overrides, "params": params["distill"], "metrics": metrics,
            "seconds": seconds, **({"base": base} if base else {})}


def table(rows: list[dict], sets: dict, command: str) -> str:
    done = [r for r in rows if "metrics" in r]
    lines = [f"Made by `{command}`" + (f" (global overrides {sets})" if sets else "") + ".",
             "FID: mean ± std over the evaluate stage's sampling seeds; lower is better. Train s: distill + "
             "finetune wall seconds.", "",
             "| variant | objective | steps | backward sim | lr | model | FID | precision | recall | FID-T | "
             "pixel W1 | NFE | ms/img | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    extra = lambda m: f"{m['fid_t']:.3f} | {m['pixel_w1']:.4f}" if "pixel_w1" in m else "— | —"
    if done:
        t = done[0]["metrics"]["teacher"]
        lines.append(f"| teacher | — | — | — | — | teacher | {t['fid']:.3f} ± {t['fid_std']:.3f} | "
                     f"{t['precision']:.3f} | {t['recall']:.3f} | {extra(t)} | {t['nfe']} | {t['latency_ms']:.3f} | — |")
    for r in done:
        d, m = r["params"], r["metrics"]
        train_s = r["seconds"]["distill"] + r["seconds"]["finetune"]
        for key in sorted(k for k in m if k.startswith("student@")):
            s = m[key]
            lines.append(f"| {r['variant']} | {d['objective']} | {d['student_steps']} | "
                         f"{'on' if d['backward_simulation'] else 'off'} | {d['lr']:g} | {key} | "
                         f"{s['fid']:.3f} ± {s['fid_std']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "
                         f"{extra(s)} | {s['nfe']} | {s['latency_ms']:.3f} | {train_s:.0f} |")
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed in {r['failed']} | | | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


W1_TARGET = 1.2  # the student's pixel W1 at most this many times the teacher's (issue 32's target)


def recipes(rows: list[dict], model: str = "student@1") -> list[dict]:
    """One entry per recipe (the overrides without `seed`), its student's FID and pixel W1 averaged over the
    training seeds, against the mean of its runs' teachers."""
    groups: dict[str, dict[int, dict]] = {}
    for r in rows:
        if "metrics" in r and model in r["metrics"]:
            recipe = {k: v for k, v in r["overrides"].items() if k != "seed"}
            seed = r["overrides"].get("seed", 0)  # a recipe run again at one seed (merged tables) counts once
            groups.setdefault(json.dumps(recipe, sort_keys=True), {}).setdefault(seed, r)
    groups = {recipe: list(by_seed.values()) for recipe, by_seed in groups.items()}
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    out = []
    for recipe, runs in groups.items():
        student = [r["metrics"][model] for r in runs]
        teacher = [r["metrics"]["teacher"] for r in runs]
        out.append({"recipe": runs[0]["variant"].split("-seed")[0], "overrides": json.loads(recipe), "seeds": len(runs),
                    "fid": mean([s["fid"] for s in student]), "pixel_w1": mean([s["pixel_w1"] for s in student]),
                    "teacher_fid_high": mean([t["fid_ci95"][1] for t in teacher]),
                    "teacher_w1": mean([t["pixel_w1"] for t in teacher])})
    for r in out:
        r["fid_ratio"] = r["fid"] / r["teacher_fid_high"]
        r["w1_ratio"] = r["pixel_w1"] / r["teacher_w1"]
        r["score"] = max(r["fid_ratio"], r["w1_ratio"] / W1_TARGET)
        r["front"] = not any(o["fid"] < r["fid"] and o["pixel_w1"] < r["pixel_w1"] for o in out)
    return sorted(out, key=lambda r: r["score"])


def rank_table(rows: list[dict], model: str = "student@1") -> str:
    ranked = recipes(rows, model)
    lines = [f"Ranked by score = max(FID / teacher's FID interval high, W1 ratio / {W1_TARGET}); <= 1 meets both "
             f"targets; front: on the Pareto front of FID and pixel W1. {model}, means over training seeds.", "",
             "| rank | recipe | seeds | FID | teacher FID high | W1 / teacher | score | meets both | front |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | {r['recipe']} | {r['seeds']} | {r['fid']:.3f} | {r['teacher_fid_high']:.3f} | "
                     f"{r['w1_ratio']:.2f}x | {r['score']:.3f} | {'yes' if r['score'] <= 1 else 'no'} | "
                     f"{'yes' if r['front'] else ''} |")
    return "\n".join(lines) + "\n"


def front_plot(rows: list[dict], path: Path, model: str = "student@1") -> None:
    """Both views of every recipe as one scatter (PNG): FID over the teacher's interval high against pixel W1
    over the teacher's, the target box (score <= 1) shaded and the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = recipes(rows, model)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.fill_between([0, 1], 0, W1_TARGET, color="tab:green", alpha=0.12, label=f"target: FID in the teacher's "
                    f"interval, W1 <= {W1_TARGET}x")
    front = sorted((r for r in ranked if r["front"]), key=lambda r: r["fid_ratio"])
    ax.plot([r["fid_ratio"] for r in front], [r["w1_ratio"] for r in front], "-", color="tab:orange",
            label="Pareto front")
    for r in ranked:
        ax.plot(r["fid_ratio"], r["w1_ratio"], "o", color="tab:orange" if r["front"] else "tab:gray")
        ax.annotate(f"{r['recipe']} ({r['seeds']})", (r["fid_ratio"], r["w1_ratio"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    xs, ys = [r["fid_ratio"] for r in ranked], [r["w1_ratio"] for r in ranked]
    ax.set_xlim(min(xs + [1]) - 0.05, max(xs + [1]) + 0.1)
    ax.set_ylim(min(ys + [1]) - 0.1, max(ys + [W1_TARGET]) + 0.1)
    ax.set_xlabel("student FID / upper end of the teacher's 95% interval")
    ax.set_ylabel("student pixel W1 / teacher's")
    ax.set_title(f"{model}: both views, means over training seeds (count in brackets)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save(path: Path, command: str, sets: dict, rows: list[dict], order: list[str]) -> None:
    rows = sorted(rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "sets": sets, "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=Path, default=ROOT / "bench" / "ablation.yaml")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="variants run at once")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--base", default=None, metavar="REV",
                    help="apply the overrides to params.yaml as of this git revision (default: the working tree's)")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from results/<--name>.json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                    help="with --table-only: one table from several results/<NAME>.json, saved as <--name>")
    ap.add_argument("--name", default="ablation", help="results file stem under bench/results/")
    ap.add_argument("--rank", action="store_true",
                    help="also rank the recipes on FID and pixel W1 (<name>-rank.md, <name>-front.png)")
    args = ap.parse_args()

    sets = parse_sets(args.set)
    out_json = RESULTS / f"{args.name}.json"
    command = "python bench/ablation.py " + " ".join(sys.argv[1:])
    if args.table_only:
        stored = [json.loads((RESULTS / f"{name}.json").read_text()) for name in (args.merge or [args.name])]
        rows = [row for part in stored for row in part["rows"]]
        command = "`, `".join(part["command"] for part in stored)
        sets = stored[0]["sets"] if all(part["sets"] == stored[0]["sets"] for part in stored) else {}
    else:
        missing = [s for s in SHARED if not (ROOT / s).exists()]
        if missing:
            sys.exit(f"bench/ablation.py: missing upstream outputs {missing}; run `dvc repro trajectories` first")
        variants = yaml.safe_load(args.variants.read_text())
        chosen = {k: v or {} for k, v in variants.items() if args.only is None or k in args.only}
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_variant, name, overrides, sets, args.base) for name, overrides in chosen.items()]
            rows = []
            for future in as_completed(futures):  # saved as they finish: a cut-off run keeps what it has
                rows.append(future.result())
                save(out_json, command, sets, rows, order=list(chosen))
    save(out_json, command, sets, rows, order=[r["variant"] for r in rows] if args.table_only else list(chosen))
    rows = json.loads(out_json.read_text())["rows"]
    markdown = table(rows, sets, command)
    (RESULTS / f"{args.name}.md").write_text(markdown)
    print(markdown)
    if args.rank:
        ranked = rank_table(rows)
        (RESULTS / f"{args.name}-rank.md").write_text(ranked)
        front_plot(rows, RESULTS / f"{args.name}-front.png")
        print(ranked)


if __name__ == "__main__":
    main()
