"""The extra pipelines are DVC projects of their own (pipelines/<name>, `dvc init --subdir`): the flow reads
them with root-relative paths, runs DVC in their folder, and gives them the root's team remote."""
import subprocess
from pathlib import Path

from fewstep.pipeline.keys import dvc_project, stage_specs
from fewstep.pipeline.store import share_remote

ROOT = Path(__file__).resolve().parents[1]


def test_sd_pipelines_are_projects_read_with_root_relative_paths():
    assert dvc_project("dvc.yaml", ROOT) == "."
    for name in ("sdxl", "sd15", "sd3"):
        assert dvc_project(f"pipelines/{name}/dvc.yaml", ROOT) == f"pipelines/{name}"
        specs = {s.name: s for s in stage_specs(ROOT, f"pipelines/{name}/dvc.yaml")}
        encode = specs["encode"]
        assert encode.project == f"pipelines/{name}" and encode.target == "encode"
        assert encode.outs == [f"pipelines/{name}/encode"] and encode.params_file == f"pipelines/{name}/params.yaml"
        assert "stages/t2i/encode.py" in encode.deps and encode.cmd == "python ../../stages/t2i/encode.py --out encode"
        assert f"pipelines/{name}/encode" in specs["distill"].deps
    # one dvc.yaml for every text-to-image pipeline: sd15's and sd3's link to sdxl's, so they cannot drift apart
    for name in ("sd15", "sd3"):
        assert (ROOT / f"pipelines/{name}/dvc.yaml").resolve() == (ROOT / "pipelines/sdxl/dvc.yaml").resolve()
    default = stage_specs(ROOT, "dvc.yaml")
    assert {s.project for s in default} == {"."} and not any(s.outs[0].startswith("pipelines/") for s in default)


def _git_dvc(folder: Path, *extra: list[str]) -> None:
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], *extra):
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True)


def test_a_pipeline_project_gets_the_root_remote(tmp_path):
    _git_dvc(tmp_path, ["dvc", "remote", "add", "-d", "team", "../store"])  # relative to where it was added
    pipeline = tmp_path / "pipelines" / "x"
    pipeline.mkdir(parents=True)
    subprocess.run(["dvc", "init", "--subdir", "-q"], cwd=pipeline, check=True, capture_output=True)

    def remote():
        listed = subprocess.run(["dvc", "remote", "list"], cwd=pipeline, capture_output=True, text=True, check=True)
        return listed.stdout.split()[:2]

    share_remote(tmp_path, "pipelines/x")
    name, url = remote()
    assert name == "team" and (pipeline / ".dvc" / url).resolve() == (tmp_path.parent / "store").resolve()

    for cmd in (["dvc", "remote", "add", "-f", "-d", "team", "s3://bucket/fewstep"],
                ["dvc", "remote", "modify", "--local", "team", "secret_access_key", "s3cr3t"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    share_remote(tmp_path, "pipelines/x")
    assert remote() == ["team", "s3://bucket/fewstep"]
    local = (pipeline / ".dvc" / "config.local").read_text()
    assert "remote = team" in local and "s3cr3t" in local  # credentials stay in the git-ignored file
    assert "team" not in (pipeline / ".dvc" / "config").read_text()
