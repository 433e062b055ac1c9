"""A team across machines: the flow's keys and records and DVC's outputs and run-cache on a real S3 server
(moto) or SFTP host, clones that share nothing else, and the faults a shared store must survive."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import _free_port
from team import (S3_CREDENTIALS, SERVERS, bucket_keys, commit, iam_bucket, machine, make_bucket, moto, report,
                  s3_client, s3_remote, s3_toy_team, sftp, sftp_remote, start, stop, toy_project)


def error_line(proc) -> str:
    """The run's one error line: printed once (nowhere else in its output), with no traceback."""
    output = proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("distill: error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert output.count(lines[0].removeprefix("distill: error: ")) == 1, output[-3000:]
    return lines[0]


@pytest.mark.slow
def test_s3_server_killed_mid_push_fails_in_one_line_and_a_rerun_recomputes_nothing(tmp_path, prefect_server):
    endpoint, server = moto(tmp_path)
    proxy = None
    try:
        make_bucket(endpoint, "team")
        port = _free_port()
        dying = [sys.executable, str(SERVERS / "dying_proxy.py"), "--listen", str(port), "--target", endpoint.rsplit(":", 1)[1]]
        proxy = start(dying + ["--die-on-put", ".dir"], tmp_path / "proxy.log", "READY")  # make's files are up, its .dir not
        project = toy_project(tmp_path / "origin")
        s3_remote(project, f"http://127.0.0.1:{port}", "team")
        commit(project)
        a = machine(project, tmp_path / "a", prefect_server["url"], S3_CREDENTIALS)

        failed = a.flow(check=False)
        assert failed.returncode == 1
        assert ("stage make: push to remote 'team' (s3://team/dvc/fewstep) failed: cannot connect to "
                f"http://127.0.0.1:{port}: is the storage server up? (its outputs are kept here: rerun to push them)"
                ) in error_line(failed)
        assert "DSA is deprecated" not in failed.stderr
        stored = bucket_keys(endpoint, "team")
        assert 0 < len(stored) and not any(k.endswith(".dir") for k in stored)  # a half-pushed output ...
        assert len([k for k in stored if k.startswith("dvc/fewstep/keys/")]) == 1  # ... is never recorded (base is)

        proxy = start(dying, tmp_path / "proxy2.log", "READY")  # the server is back
        assert report(a.flow()) == {"base": "cached", "make": "up-to-date", "total": "computed"}  # make pushed, not rerun
        assert (a.root / "runs.log").read_text() == "base\nmake\ntotal\n"
        assert any(k.endswith(".dir") for k in bucket_keys(endpoint, "team"))
    finally:
        stop(proxy)
        stop(server)


@pytest.mark.slow
def test_s3_lost_and_rotted_objects_are_never_used_then_repaired_so_the_next_clone_computes_nothing(tmp_path, prefect_server):
    endpoint, server = moto(tmp_path)
    try:
        project = s3_toy_team(tmp_path, endpoint)
        a = machine(project, tmp_path / "a", prefect_server["url"], S3_CREDENTIALS)
        assert report(a.flow()) == {"base": "computed", "make": "computed", "total": "computed"}

        # two file objects of make's output vanish from the store (a half-finished upload, a bad cleanup) and
        # one rots in place, under its own name
        s3 = s3_client(endpoint)
        objects = [k for k in bucket_keys(endpoint, "team", "dvc/files/md5/") if not k.endswith(".dir")
                   and s3.get_object(Bucket="team", Key=k)["Body"].read().startswith(b"part")]
        assert len(objects) == 40
        for key in objects[:2]:
            s3.delete_object(Bucket="team", Key=key)
        s3.put_object(Bucket="team", Key=objects[2], Body=b"rotted")

        b = machine(project, tmp_path / "b", prefect_server["url"], S3_CREDENTIALS)
        proc = b.flow("--fetch", "all")
        assert report(proc) == {"base": "cached", "make": "recomputed", "total": "cached"}
        assert "make: outputs in remote 'team' (s3://team/dvc/fewstep) are incomplete or damaged" in proc.stdout + proc.stderr
        assert (b.root / "runs.log").read_text() == "make\n"  # total was not recomputed

        assert s3.get_object(Bucket="team", Key=objects[2])["Body"].read() != b"rotted", proc.stdout + proc.stderr

        c = machine(project, tmp_path / "c", prefect_server["url"], S3_CREDENTIALS)
        assert report(c.flow("--fetch", "all")) == {"base": "cached", "make": "cached", "total": "cached"}
        assert not (c.root / "runs.log").exists() and (c.root / "made" / "part0.txt").is_file()
        assert all((c.root / "made" / f.name).read_bytes() == f.read_bytes() for f in (b.root / "made").iterdir())
    finally:
        stop(server)


@pytest.mark.slow
def test_s3_and_sftp_wrong_credentials_are_one_line_before_any_stage_runs(tmp_path, prefect_server):
    endpoint, server = moto(tmp_path, auth=True)
    port, _, sftp_server = sftp(tmp_path)
    try:
        key, secret = iam_bucket(endpoint, "team")
        project = toy_project(tmp_path / "s3")
        s3_remote(project, endpoint, "team")
        commit(project)
        good = machine(project, tmp_path / "good", prefect_server["url"],
                       {"access_key_id": key, "secret_access_key": secret})
        assert report(good.flow()) == {"base": "computed", "make": "computed", "total": "computed"}
        bad = machine(project, tmp_path / "bad", prefect_server["url"],
                      {"access_key_id": key, "secret_access_key": "not-the-secret"})
        proc = bad.flow(check=False)
        assert proc.returncode == 1
        assert "cannot reach remote 'team' (s3://team/dvc/fewstep)" in error_line(proc)
        assert not (bad.root / "runs.log").exists()

        project = toy_project(tmp_path / "ssh")
        sftp_remote(project, port)
        commit(project)
        stranger = machine(project, tmp_path / "stranger", prefect_server["url"],
                           {"keyfile": str(tmp_path / "keys" / "stranger")})
        proc = stranger.flow(check=False)
        assert proc.returncode == 1
        assert f"cannot reach remote 'team' (ssh://127.0.0.1:{port}/store/fewstep)" in error_line(proc)
        assert "Permission denied" in error_line(proc)
        assert not (stranger.root / "runs.log").exists()
    finally:
        stop(server)
        stop(sftp_server)


@pytest.mark.slow
def test_sftp_team_push_from_a_then_a_fully_cached_run_and_dvc_run_cache_on_b(tmp_path, prefect_server):
    port, keyfile, server = sftp(tmp_path)
    try:
        project = toy_project(tmp_path / "origin")  # the store is what is tested: the toy's stages take seconds
        sftp_remote(project, port)
        commit(project)
        a = machine(project, tmp_path / "a", prefect_server["url"], {"keyfile": str(keyfile)})
        assert report(a.flow()) == {"base": "computed", "make": "computed", "total": "computed"}
        assert (tmp_path / "sftp-root" / "store" / "fewstep" / "keys").is_dir()  # the flow's keys on the host

        b = machine(project, tmp_path / "b", prefect_server["url"], {"keyfile": str(keyfile)})
        proc = b.flow()
        assert report(proc) == {"base": "cached", "make": "cached", "total": "cached"}
        assert "total: outputs fetched and verified" in proc.stdout + proc.stderr
        assert (b.root / "total.json").read_bytes() == (a.root / "total.json").read_bytes()
        assert not (b.root / "made").exists()  # only what the run needs comes over

        # plain DVC on the same host: the run-cache A pushed lets B reproduce every stage without running one
        repro = b.sh("dvc", "repro", "--pull")
        assert "Running stage" not in repro.stdout and repro.stdout.count("is cached - skipping run") == 2, repro.stdout
        assert "Stage 'total' didn't change" in repro.stdout  # the flow fetched total's outputs above
        assert not (b.root / "runs.log").exists()
    finally:
        stop(server)


@pytest.mark.slow
def test_worker_with_other_code_refuses_the_stage_in_one_line(tmp_path, prefect_server):
    """A worker's clone that differs from the requester's cannot compute what was asked for: it says so."""
    project = toy_project(tmp_path / "origin")
    commit(project)
    worker = machine(project, tmp_path / "worker", prefect_server["url"])
    (worker.root / "stages" / "make.py").write_text((worker.root / "stages" / "make.py").read_text() + "# local edit\n")
    commit(worker.root, "the worker's clone is at another commit")
    code = ("import sys; sys.path.insert(0, 'flows'); from stage import stage; "
            "s = stage('default', 'make', 'f' * 32, {}, return_state=True); print('MESSAGE', s.message)")
    out = worker.sh(sys.executable, "-c", code).stdout
    message = out.split("MESSAGE ", 1)[1].strip()
    assert message.startswith(f"stage make: this worker's checkout of {worker.root} (commit ")
    assert "the run asked for ffffffffffff: its code differs from the requester's" in message
    assert not (worker.checkout() / "runs.log").exists() and worker.unchanged()


def _wait_for(condition, proc, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.5)


def _finish(m, proc, log: str = "flow.log") -> dict:
    assert proc.wait(timeout=600) == 0, (m.home / log).read_text()[-3000:]
    return report(subprocess.CompletedProcess([], 0, (m.home / log).read_text(), ""))


@pytest.mark.slow
def test_team_two_machines_compute_one_key_once_and_a_dead_holder_frees_it(tmp_path, prefect_server):
    """Two clones ask for the same uncached key together: one computes, the other waits on the lease held on
    the Prefect server and takes the record as a hit. A holder that dies stops renewing its lease; the
    waiter then computes the key itself within the lease time."""
    endpoint, server = moto(tmp_path)
    a_run = b_run = None
    try:
        project = s3_toy_team(tmp_path, endpoint)
        a = machine(project, tmp_path / "a", prefect_server["url"], S3_CREDENTIALS)
        b = machine(project, tmp_path / "b", prefect_server["url"], S3_CREDENTIALS)
        waiting = lambda: "waiting for its record" in (b.home / "flow.log").read_text()

        (a.root / "slow").write_text("1")  # a's `make` runs until this file goes
        a_run = a.start_flow()
        _wait_for((a.root / "started-make").exists, a_run, "start of make on a")
        b_run = b.start_flow("--fetch", "all")
        _wait_for(waiting, b_run, "wait on a's lease")
        time.sleep(3)
        assert not (b.root / "started-make").exists()  # b waits instead of computing
        (a.root / "slow").unlink()
        a_report, b_report = _finish(a, a_run), _finish(b, b_run)
        assert a_report["make"] == "computed" and b_report["make"] == "cached", (a_report, b_report)
        logs = [(m.root / "runs.log").read_text().split() if (m.root / "runs.log").exists() else [] for m in (a, b)]
        assert sorted(logs[0] + logs[1]) == ["base", "make", "total"]  # every key computed once, team-wide
        for rel in ("base.txt", "total.json", "made/part0.txt", "made/part39.txt", "dvc.lock"):
            assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel

        # b's own run of total gives other bytes (as a latency measurement would): the record is kept, and said
        (b.root / "total.json").write_text('{"bytes": 0}')
        b.sh("dvc", "commit", "-f", "total")
        proc = b.flow()
        assert report(proc)["total"] == "cached"
        assert ("total: this workspace computed other bytes for the same inputs (1 files differ, e.g. total.json); "
                "keeping the team's record, from ") in proc.stdout + proc.stderr
        assert (b.root / "total.json").read_bytes() == (a.root / "total.json").read_bytes()

        # the holder dies mid-stage (its flow and the stage it runs, killed): its lease runs out
        for m in (a, b):
            (m.root / "started-make").unlink(missing_ok=True)
        (a.root / "slow").write_text("1")
        a_run = a.start_flow("--set", "seed=1", log="flow2.log")
        _wait_for((a.root / "started-make").exists, a_run, "start of make on a")
        b_run = b.start_flow("--set", "seed=1")
        _wait_for(waiting, b_run, "wait on a's lease")
        os.killpg(a_run.pid, signal.SIGKILL)
        a_run.wait()
        killed = time.time()
        b_report = _finish(b, b_run)
        assert b_report == {"base": "cached", "make": "computed", "total": "computed"}
        assert time.time() - killed < 60 + 2 + 30  # lease, the server's expiry sweep, a retry, the stage itself
        assert (b.root / "made" / "part0.txt").read_text().startswith("part 0 of seed 1")
        assert b.sh("git", "status", "--porcelain", "params.yaml").stdout == ""  # --set applied to that run only
    finally:
        for proc in (a_run, b_run):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stop(server)
