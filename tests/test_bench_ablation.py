"""bench/ablation.py's table: rows of several result files merged into one markdown table."""
import importlib.util
import json
import sys

import pytest

from conftest import ROOT


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(variant, lr, fids):
    model = lambda fid: {"fid": fid, "fid_std": 0.01, "precision": 0.8, "recall": 0.9, "nfe": 1, "latency_ms": 1.0}
    metrics = {"teacher": model(1.4), **{f"student@{k}": model(f) for k, f in fids.items()}}
    return {"variant": variant, "overrides": {}, "metrics": metrics, "seconds": {"distill": 10, "finetune": 2},
            "params": {"objective": "dmd2", "student_steps": max(fids), "backward_simulation": True, "lr": lr}}


def test_merge_builds_one_table_from_several_runs(tmp_path, monkeypatch):
    ablation = load_ablation()
    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"command": "run a", "sets": {}, "rows": [result("x", 2e-4, {1: 1.5})]}))
    (tmp_path / "b.json").write_text(json.dumps({"command": "run b", "sets": {}, "rows": [
        result("y", 1e-4, {1: 2.0, 2: 1.3, 4: 1.2}), {"variant": "z", "overrides": {}, "failed": "distill"}]}))
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--table-only", "--merge", "a", "b", "--name", "both"])
    ablation.main()

    table = (tmp_path / "both.md").read_text()
    assert "`run a`, `run b`" in table
    rows = [line for line in table.splitlines() if line.startswith("| x ") or line.startswith("| y ")]
    assert [r.split(" | ")[5] for r in rows] == ["student@1", "student@1", "student@2", "student@4"]
    assert "| y | dmd2 | 4 | on | 0.0001 | student@4 | 1.200 ± 0.010 |" in table
    assert "| z | failed in distill |" in table
    assert [r["variant"] for r in json.loads((tmp_path / "both.json").read_text())["rows"]] == ["x", "y", "z"]


def test_rank_rule_averages_training_seeds_and_scores_both_views():
    """The pick is a rule: max(FID / teacher's FID interval high, W1 ratio / 1.2); seeds of one recipe averaged."""
    ablation = load_ablation()

    def row(variant, fid, w1, seed=None):
        model = lambda f, w: {"fid": f, "fid_ci95": [f - 0.3, f + 0.3], "pixel_w1": w}  # noqa: E731
        overrides = {"distill.t_max": variant} | ({"seed": seed} if seed is not None else {})
        name = f"v{variant}" + (f"-seed{seed}" if seed is not None else "")
        return {"variant": name, "overrides": overrides,
                "metrics": {"teacher": model(1.4, 0.010), "student@1": model(fid, w1)}}

    rows = [row(0.7, 1.2, 0.020, 0), row(0.7, 1.4, 0.030, 1),  # sharp features, speckle: W1 2.5x
            row(0.9, 1.6, 0.011),                               # both views within target (1.6 <= 1.7, 1.1x)
            row(0.95, 1.9, 0.0105),                             # clean pixels, FID past the teacher's interval
            row(0.8, 2.0, 0.025)]                               # worse than v0.7 in both views: off the front
    ranked = ablation.recipes(rows)
    assert [r["recipe"] for r in ranked] == ["v0.9", "v0.95", "v0.7", "v0.8"]
    best = ranked[0]
    assert best["score"] <= 1 and abs(best["w1_ratio"] - 1.1) < 1e-9
    by_name = {r["recipe"]: r for r in ranked}
    assert by_name["v0.7"]["seeds"] == 2 and abs(by_name["v0.7"]["fid"] - 1.3) < 1e-9
    assert abs(by_name["v0.7"]["score"] - 2.5 / 1.2) < 1e-9
    assert {r["recipe"]: r["front"] for r in ranked} == {"v0.9": True, "v0.95": True, "v0.7": True, "v0.8": False}
    table = ablation.rank_table(rows)
    assert "| 1 | v0.9 | 1 | 1.600 |" in table and "| yes | yes |" in table


def test_rank_counts_a_recipe_measured_twice_at_one_seed_once():
    """Merged tables can hold the same recipe and seed twice (the default in two studies): one seed, not two."""
    ablation = load_ablation()
    model = lambda f: {"fid": f, "fid_ci95": [f - 0.3, f + 0.3], "pixel_w1": 0.02}  # noqa: E731
    row = lambda name, overrides, fid: {"variant": name, "overrides": overrides,  # noqa: E731
                                        "metrics": {"teacher": model(1.4), "student@1": model(fid)}}
    ranked = ablation.recipes([row("t0.5-0.7", {}, 1.2), row("default", {}, 1.2), row("default-seed1", {"seed": 1}, 1.4)])
    assert [(r["recipe"], r["seeds"]) for r in ranked] == [("t0.5-0.7", 2)]
    assert abs(ranked[0]["fid"] - 1.3) < 1e-9


def test_a_finished_stage_is_skipped_only_while_its_command_params_code_and_upstream_are_unchanged(tmp_path,
                                                                                                    monkeypatch):
    """run_variant reruns a variant's stages only when what they were run with changed (stages stubbed)."""
    ablation = load_ablation()
    monkeypatch.setattr(ablation, "WORK", tmp_path)
    ran = []

    def stage_command(cmd, cwd, **kwargs):
        ran.append(next(s for s in ablation.STAGES if f"stages/{s}.py" in cmd))
        if ran[-1] == "evaluate":
            (cwd / "evaluate").mkdir(exist_ok=True)
            (cwd / "evaluate" / "metrics.json").write_text(json.dumps({"student@1": {"fid": 1.0}}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(ablation.subprocess, "run", stage_command)
    first = ablation.run_variant("v", {"distill.lr": 1e-4}, {})
    assert ran == list(ablation.STAGES) and first["metrics"] == {"student@1": {"fid": 1.0}}
    ran.clear()
    ablation.run_variant("v", {"distill.lr": 1e-4}, {})
    assert ran == []  # all four finished with these params and this code
    ablation.run_variant("v", {"distill.lr": 2e-4}, {})
    assert ran == list(ablation.STAGES)
    ran.clear()
    ablation.CODE = "edited"  # the hash of fewstep/ and stages/ at import: any edit of the code
    ablation.run_variant("v", {"distill.lr": 2e-4}, {})
    assert ran == list(ablation.STAGES)
    ran.clear()
    (tmp_path / "v" / ".done-critic").unlink()  # a stage without its marker reruns; its key is unchanged, so
    ablation.run_variant("v", {"distill.lr": 2e-4}, {})  # the stages after it stand
    assert ran == ["critic"]


def test_front_plot_draws_every_recipe_into_a_png(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablation = load_ablation()
    model = lambda f, w: {"fid": f, "fid_ci95": [f - 0.3, f + 0.3], "pixel_w1": w}  # noqa: E731
    rows = [{"variant": f"v{i}", "overrides": {"distill.t_max": t},
             "metrics": {"teacher": model(1.4, 0.01), "student@1": model(fid, w1)}}
            for i, (t, fid, w1) in enumerate([(0.7, 1.2, 0.02), (0.9, 1.6, 0.011), (0.95, 1.9, 0.0105),
                                              (0.8, 2.0, 0.025)])]  # v3: worse than v0 in both views
    made, subplots = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(subplots(*a, **k)) or made[-1])
    ablation.front_plot(rows, tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = made[0][1]
    assert sorted(t.get_text() for t in ax.texts) == ["v0 (1)", "v1 (1)", "v2 (1)", "v3 (1)"]
    points = [line for line in ax.lines if line.get_marker() == "o"]
    gray = [(line.get_xdata()[0], line.get_ydata()[0]) for line in points if line.get_color() == "tab:gray"]
    assert len(points) == 4 and gray == [pytest.approx((2.0 / 1.7, 2.5))]  # only v3 is off the front
