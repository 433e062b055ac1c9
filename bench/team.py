"""Team cache benchmark: machine B's fully cached run (fetch + verify) against recomputing the pipeline.

Everything real and local: a Prefect server, moto's S3 server, and two clones of this repository with
their own HOME and Prefect home. Machine A runs the flow from scratch (computes every stage and pushes
it); machine B, a fresh clone sharing nothing with A but the two servers, runs the same flow and gets
every stage from the store, fetching and verifying every output (`--fetch all`); machine C does the same
with the default `--fetch needed` (the final stages' outputs only). Then the collision case: B alone runs
an uncached evaluation change (`evaluate.knn_k=4`: same cost as the default's), and A and C start another
one (`knn_k=5`) at the same moment; each side's compute is the CPU seconds of its flow processes and
everything they ran (os.wait4), so a machine that waits on the other's lease spends only its start-up.
Prints one JSON object; --out writes it with a markdown table.

    python bench/team.py                        # the embedded default pipeline (minutes)
    python bench/team.py --tiny --out /tmp/t    # seconds-sized params (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["featurizer.steps=20", "teacher.steps=8", "trajectories.num_samples=40", "trajectories.sampling_steps=3",
        "critic.steps=2", "distill.steps=3", "finetune.steps=2", "evaluate.batch_size=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


def sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def machine_env(home: Path, api: str) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FEWSTEP_", "PREFECT_"))}
    return env | {"HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "PREFECT_API_URL": api,
                  "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "GIT_AUTHOR_NAME": "bench",
                  "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
                  "GIT_COMMITTER_EMAIL": "bench@example.com"}


def timed_flow(root: Path, env: dict, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = sh([sys.executable, "flows/distill.py", *args], root, env).stdout
    return time.perf_counter() - start, json.loads(out[out.index("{"):out.rindex("}") + 1])


def start_flow(root: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "flows/distill.py", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def cpu_seconds(proc: subprocess.Popen) -> tuple[float, dict]:
    """CPU seconds of a flow run's process tree (user + system), and its report."""
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"flow run failed ({proc.returncode}):\n{out[-2000:]}")
    return usage.ru_utime + usage.ru_stime, json.loads(out[out.index("{"):out.rindex("}") + 1])


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-sized params instead of the default's")
    ap.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fewstep-team-"))
    servers = []
    try:
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        server_env = machine_env(work / "server", api) | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                                          "PREFECT_SERVER_UI_ENABLED": "false"}
        servers.append(serve([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                             server_env, f"{api}/health", work / "prefect.log"))
        s3 = free_port()
        servers.append(serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3)], server_env,
                             f"http://127.0.0.1:{s3}/", work / "moto.log"))
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3}", aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="team")

        # the team's repository: this checkout's pipeline and code, with the S3 remote committed
        origin = work / "origin"
        sh(["git", "clone", "-q", str(ROOT), str(origin)], work, machine_env(work / "origin-home", api))
        env = machine_env(work / "origin-home", api)
        for cmd in (["dvc", "remote", "add", "-d", "team", "s3://team/dvc"],
                    ["dvc", "remote", "modify", "team", "endpointurl", f"http://127.0.0.1:{s3}"],
                    ["git", "add", ".dvc/config"], ["git", "commit", "-qm", "team remote"]):
            sh(cmd, origin, env)
        results = {"pipeline": "default" + (" (tiny params)" if args.tiny else ""), "commit":
                   sh(["git", "rev-parse", "--short", "HEAD"], ROOT, env).stdout.strip()}
        overrides = [a for kv in TINY for a in ("--set", kv)] if args.tiny else []
        machines = {}
        for name in ("a", "b", "c"):
            root, menv = work / name, machine_env(work / f"{name}-home", api)
            menv["PYTHONPATH"] = str(root)  # each clone imports its own fewstep, not the venv's editable install
            sh(["git", "clone", "-q", str(origin), str(root)], work, menv)
            for option, value in (("access_key_id", "bench"), ("secret_access_key", "bench")):
                sh(["dvc", "remote", "modify", "--local", "team", option, value], root, menv)
            machines[name] = (root, menv)

        a_root, a_env = machines["a"]
        results["recompute_s"], report = timed_flow(a_root, a_env, *overrides)
        assert set(report.values()) == {"computed"}, report
        b_root, b_env = machines["b"]
        results["fetch_s"], report_all = timed_flow(b_root, b_env, *overrides, "--fetch", "all")
        results["bytes_moved"] = tree_bytes(b_root / ".dvc" / "cache")  # every object B downloaded
        c_root, c_env = machines["c"]
        results["fetch_needed_s"], report_needed = timed_flow(c_root, c_env, *overrides)
        results["bytes_moved_needed"] = tree_bytes(c_root / ".dvc" / "cache")
        assert set(report_needed.values()) == set(report_all.values()) == {"cached"}, (report_needed, report_all)

        # one uncached key: B alone; then A and C asking for another at the same moment
        results["single_compute_s"], single = cpu_seconds(start_flow(b_root, b_env, *overrides, "--set", "evaluate.knn_k=4"))
        both = [start_flow(m_root, m_env, *overrides, "--set", "evaluate.knn_k=5") for m_root, m_env in (machines["a"], machines["c"])]
        spent = [cpu_seconds(proc) for proc in both]
        results["collision_compute_s"] = sum(s for s, _ in spent)
        results["collision_reports"] = {name: r["evaluate"] for name, (_, r) in zip("ac", spent)}
        assert single["evaluate"] == "computed" and sorted(results["collision_reports"].values()) == ["cached", "computed"], \
            (single, results["collision_reports"])
        results["collision_ratio"] = round(results["collision_compute_s"] / results["single_compute_s"], 3)
        results["collision_goal"] = "collision_compute_s / single_compute_s <= 1.3"
        results["ratio"] = round(results["fetch_s"] / results["recompute_s"], 4)
        results["ratio_needed"] = round(results["fetch_needed_s"] / results["recompute_s"], 4)
        for key in ("recompute_s", "fetch_s", "fetch_needed_s", "single_compute_s", "collision_compute_s"):
            results[key] = round(results[key], 2)
        results["goal"] = "fetch_s / recompute_s <= 0.10"
        print(json.dumps(results, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(
                f"# Team cache: machine B's cached run vs recomputing ({results['pipeline']}, commit {results['commit']})\n\n"
                "`python bench/team.py" + (" --tiny" if args.tiny else "") + f" --out {args.out}`: a Prefect server, "
                "moto's S3 server and three clones with their own homes, on one 2-core machine.\n\n"
                "| run | seconds | fetched bytes | ratio to recompute |\n|---|---|---|---|\n"
                f"| A: recompute every stage (and push) | {results['recompute_s']} | - | 1 |\n"
                f"| B: all hits, fetch + verify every output (`--fetch all`) | {results['fetch_s']} | {results['bytes_moved']:,} | {results['ratio']} |\n"
                f"| C: all hits, fetch + verify the final outputs (default) | {results['fetch_needed_s']} | {results['bytes_moved_needed']:,} | {results['ratio_needed']} |\n"
                "\n## Two machines, one uncached key\n\n"
                "CPU seconds of the flow runs' process trees (Prefect start-up included), for an evaluation change:\n\n"
                "| case | CPU seconds | ratio |\n|---|---|---|\n"
                f"| B alone (`evaluate.knn_k=4`) | {results['single_compute_s']} | 1 |\n"
                f"| A and C at the same moment (`evaluate.knn_k=5`: {results['collision_reports']['a']} on A, "
                f"{results['collision_reports']['c']} on C) | {results['collision_compute_s']} | {results['collision_ratio']} |\n")
    finally:
        for proc in servers:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
