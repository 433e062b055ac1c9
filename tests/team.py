"""Real servers and separate "machines" for the team tests: moto's standalone S3 server, an asyncssh
SFTP server, a proxy that dies mid-push, and clones that share nothing but those servers (each its own
HOME, Prefect home and DVC cache)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT, _free_port, env, run

BIN = Path(sys.executable).parent
SERVERS = Path(__file__).parent / "servers"


def start(cmd: list[str], log: Path, ready: str, extra_env: dict | None = None, timeout: float = 60) -> subprocess.Popen:
    """Start a server process logging to `log`; return once `ready` appears in its log."""
    out = open(log, "w")
    proc = subprocess.Popen(cmd, env=env() | (extra_env or {}), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout
    while ready not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process and everything it started (workers start flow-run processes)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def moto(folder: Path, port: int | None = None, auth: bool = False) -> tuple[str, subprocess.Popen]:
    """moto's S3 server on 127.0.0.1; with auth, the first four calls (IAM user, key, policy, bucket) are
    free and every later request must carry a valid signature."""
    port = port or _free_port()
    extra = {"INITIAL_NO_AUTH_ACTION_COUNT": "4"} if auth else {}
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], folder / f"moto-{port}.log",
                 "Running on", extra)
    return f"http://127.0.0.1:{port}", proc


def s3_client(endpoint: str, key: str = "testing", secret: str = "testing"):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")


def make_bucket(endpoint: str, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket)


def iam_bucket(endpoint: str, bucket: str) -> tuple[str, str]:
    """On an auth-enabled moto: a user with S3 rights and a bucket; returns its (key id, secret)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                       region_name="us-east-1")
    iam.create_user(UserName="team")
    key = iam.create_access_key(UserName="team")["AccessKey"]
    iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    s3_client(endpoint, key["AccessKeyId"], key["SecretAccessKey"]).create_bucket(Bucket=bucket)
    return key["AccessKeyId"], key["SecretAccessKey"]


def bucket_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    s3 = s3_client(endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def sftp(folder: Path) -> tuple[int, Path, subprocess.Popen]:
    """An SFTP server with key authentication; returns (port, the authorized client key file, process)."""
    import asyncssh

    keys = folder / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("host", "client", "stranger"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(keys / name)
        key.write_public_key(keys / f"{name}.pub")
        os.chmod(keys / name, 0o600)
    (folder / "sftp-root").mkdir(exist_ok=True)
    log = folder / "sftp.log"
    proc = start([sys.executable, str(SERVERS / "sftp_server.py"), "--root", str(folder / "sftp-root"),
                  "--authorized-keys", str(keys / "client.pub"), "--host-key", str(keys / "host")], log, "READY")
    port = int(log.read_text().split("READY")[1].split()[0])
    return port, keys / "client", proc


@dataclass
class Machine:
    """A clone of the team's repository with a home of its own, as on another computer."""

    root: Path
    home: Path
    api: str
    extra_env: dict = field(default_factory=dict)

    def env(self) -> dict:
        e = env() | {"HOME": str(self.home), "PREFECT_HOME": str(self.home / ".prefect"), "PREFECT_API_URL": self.api,
                     "FEWSTEP_ROOT": str(self.root), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                     "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "AWS_MAX_ATTEMPTS": "1",
                     "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
                     "XDG_CACHE_HOME": str(self.home / ".cache"), **self.extra_env}
        for name in ("FEWSTEP_CACHE_DIR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK", "AWS_PROFILE"):
            e.pop(name, None)
        return e

    def checkout(self, purpose: str = "stage") -> Path:
        """Where this machine's worker runs what it is sent (fewstep.pipeline.worktree)."""
        from fewstep.pipeline.worktree import checkout_dir

        saved = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(self.home / ".cache")
        try:
            return checkout_dir(self.root, purpose)
        finally:
            os.environ.pop("XDG_CACHE_HOME") if saved is None else os.environ.__setitem__("XDG_CACHE_HOME", saved)

    def unchanged(self) -> bool:
        """The clone holds exactly what git checked out: no edited file, no output, no stray file."""
        status = self.sh("git", "status", "--porcelain", "--ignored", "--untracked-files=all").stdout.splitlines()
        return all(line.startswith("!!") and (line.split()[-1].startswith((".fewstep/", ".dvc/"))
                                              or "__pycache__/" in line) for line in status)

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=self.root, env=self.env(), capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}) in {self.root}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def flow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(sys.executable, "flows/distill.py", *args, check=check)

    def start_flow(self, *args: str, log: str = "flow.log") -> subprocess.Popen:
        """The flow in the background, in a process group of its own (a test can kill the whole machine's run);
        its output goes to `<home>/<log>`."""
        out = open(self.home / log, "w")
        return subprocess.Popen([sys.executable, "flows/distill.py", *args], cwd=self.root, env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def worker(self, pool: str) -> subprocess.Popen:
        log = self.home / f"worker-{pool}.log"
        out = open(log, "w")
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{self.root.name}-{pool}"],
                                cwd=self.root, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def machine(src: Path, dest: Path, api: str, credentials: dict[str, str] | None = None) -> Machine:
    """Clone `src` into `dest` with its own home; `credentials` go to its .dvc/config.local."""
    home = dest.parent / f"{dest.name}-home"
    home.mkdir(parents=True)
    run(["git", "clone", "-q", str(src), str(dest)], dest.parent)
    m = Machine(dest, home, api)
    for option, value in (credentials or {}).items():
        m.sh("dvc", "remote", "modify", "--local", "team", option, value)
    return m


def report(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def toy_project(folder: Path, files: int = 40) -> Path:
    """A three-stage pipeline of trivial scripts (seconds per stage) that exercises every store mechanism:
    base (cpu) -> make (gpu pool) -> total (cpu). Each stage appends to runs.log, outside its outputs, so
    a test can count real computations; `make` marks its start and sleeps while a file `slow` exists (both
    paths relative to the workspace, or TOY_STARTED / TOY_SLOW)."""
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fewstep", folder / "fewstep", ignore=ignore)
    shutil.copytree(ROOT / "flows", folder / "flows", ignore=ignore)
    (folder / "stages").mkdir()
    (folder / "stages" / "base.py").write_text(
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1]).write_text(f'base of seed {sys.argv[2]}\\n')\n"
        "open('runs.log', 'a').write('base\\n')\n")
    (folder / "stages" / "make.py").write_text(
        "import os, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(os.environ.get('TOY_STARTED', 'started-make')).write_text('1')\n"
        "while pathlib.Path(os.environ.get('TOY_SLOW', 'slow')).exists():\n"
        "    time.sleep(0.5)\n"
        f"for i in range({files}):\n"
        "    (out / f'part{i}.txt').write_text(f'part {i} of seed {sys.argv[2]}\\n' * 200)\n"
        "open('runs.log', 'a').write('make\\n')\n")
    (folder / "stages" / "total.py").write_text(
        "import sys, json, pathlib\n"
        "parts = sorted(pathlib.Path(sys.argv[1]).glob('*.txt'))\n"
        "pathlib.Path(sys.argv[2]).write_text(json.dumps({'bytes': sum(p.stat().st_size for p in parts)}))\n"
        "open('runs.log', 'a').write('total\\n')\n")
    (folder / "params.yaml").write_text("seed: 0\n")
    (folder / "dvc.yaml").write_text(
        "stages:\n"
        "  base:\n"
        "    cmd: python stages/base.py base.txt ${seed}\n"
        "    deps: [stages/base.py]\n"
        "    params: [seed]\n"
        "    outs: [base.txt]\n"
        "  make:\n"
        "    meta: {pool: gpu}\n"
        "    cmd: python stages/make.py made ${seed}\n"
        "    deps: [stages/make.py, base.txt]\n"
        "    params: [seed]\n"
        "    outs: [made]\n"
        "  total:\n"
        "    cmd: python stages/total.py made total.json\n"
        "    deps: [stages/total.py, made]\n"
        "    outs: [total.json]\n")
    (folder / ".gitignore").write_text("runs.log\nstarted-make\nslow\n.fewstep/\n__pycache__/\n")
    shutil.copy(ROOT / "prefect.yaml", folder / "prefect.yaml")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        run(cmd, folder)
    return folder


def s3_remote(project: Path, endpoint: str, bucket: str) -> None:
    """The team remote, committed (no credentials: those go to each clone's .dvc/config.local)."""
    for cmd in (["dvc", "remote", "add", "-d", "team", f"s3://{bucket}/dvc"],
                ["dvc", "remote", "modify", "team", "endpointurl", endpoint],
                ["dvc", "remote", "modify", "team", "connect_timeout", "5"],
                ["dvc", "remote", "modify", "team", "read_timeout", "30"]):
        run(cmd, project)


def s3_toy_team(folder: Path, endpoint: str) -> Path:
    """The team's repository of the toy pipeline with its S3 remote (bucket `team`, made here), committed."""
    make_bucket(endpoint, "team")
    project = toy_project(folder / "origin")
    s3_remote(project, endpoint, "team")
    commit(project)
    return project


def sftp_remote(project: Path, port: int) -> None:
    for cmd in (["dvc", "remote", "add", "-d", "team", f"ssh://team@127.0.0.1:{port}/store"],
                ["dvc", "remote", "modify", "team", "timeout", "10"]):
        run(cmd, project)


def commit(project: Path, message: str = "team project") -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", message], project)


S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
