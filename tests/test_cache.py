"""Content addressing: xxh3 digests, memoization, stage keys from DVC's graph, manifest verification."""
import hashlib
import os

import pytest
import xxhash

from conftest import ROOT
from fewstep.pipeline.keys import StageSpec, stage_keys, stage_specs
from fewstep.pipeline.hashing import Hasher, file_digest, manifest, verify


def test_file_digest_is_xxh3_128(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"fewstep" * 1000)
    assert file_digest(f) == xxhash.xxh3_128_hexdigest(b"fewstep" * 1000)
    assert file_digest(f) != hashlib.md5(f.read_bytes()).hexdigest()


def test_memo_by_size_and_mtime(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    memo = tmp_path / "memo.json"
    hasher = Hasher(memo)
    first = hasher.file(f)
    hasher.save()
    old = os.stat(f)
    f.write_bytes(b"three")  # another size, the same mtime: the size alone must invalidate
    os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert Hasher(memo).file(f) == file_digest(f) != first
    f.write_bytes(b"one")  # the same size as memoized, a later mtime: the mtime alone must invalidate
    os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    stale = Hasher(memo)
    stale.memo[f"{f.resolve()}|{old.st_size}|{old.st_mtime_ns}"] = "stale"
    assert stale.file(f) == first
    st = os.stat(f)
    again = Hasher(memo)
    again.memo[f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"] = "sentinel"
    assert again.file(f) == "sentinel"  # an unchanged (path, size, mtime) is not reread


def test_stage_graph_comes_from_dvc():
    specs = stage_specs(ROOT, "dvc.yaml")  # the default pipeline (pipelines/*/dvc.yaml are others)
    names = [s.name for s in specs]
    assert sorted(names) == sorted(["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"])
    assert names.index("prepare") < names.index("teacher") < names.index("critic") < names.index("distill")
    assert names.index("distill") < names.index("finetune") < names.index("evaluate")
    distill = specs[names.index("distill")]
    assert "distill" in distill.params and "critic" in distill.deps and distill.outs == ["distill"]


def _project(tmp_path):
    """Two stages: a (script importing lib.util, a data file, param p.a) -> b (script, a's output, p.b)."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "__init__.py").write_text("")
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    (tmp_path / "lib" / "other.py").write_text("Y = 2\n")
    (tmp_path / "stages" / "a.py").write_text("from lib.util import X\n")
    (tmp_path / "stages" / "b.py").write_text("print(2)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(b"abc")
    (tmp_path / "out_a").mkdir()
    (tmp_path / "out_a" / "f.bin").write_bytes(b"made by a")
    (tmp_path / "params.yaml").write_text("p:\n  a: 1\n  b: 2\n")
    a = StageSpec("a", "python stages/a.py", ["stages/a.py", "lib/__init__.py", "lib/util.py", "data"], ["p.a"],
                  "params.yaml", ["out_a"])
    b = StageSpec("b", "python stages/b.py", ["stages/b.py", "out_a"], ["p.b"], "params.yaml", ["out_b"])
    return [a, b]


def _keys(specs, root) -> dict[str, str]:
    return {name: k.key for name, k in stage_keys(specs, root, Hasher()).items()}


@pytest.mark.parametrize("edit, changed", [
    ("lib/util.py", {"a", "b"}),          # a's code closure; b through a's key (Merkle)
    ("lib/__init__.py", {"a", "b"}),
    ("stages/b.py", {"b"}),
    ("data/x.bin", {"a", "b"}),           # a's data input
    ("lib/other.py", set()),              # imported by nobody
    ("out_a/f.bin", set()),               # b depends on a's key, not on the bytes in this workspace
])
def test_merkle_key_changes_exactly_when_something_the_stage_reads_changes(tmp_path, edit, changed):
    specs = _project(tmp_path)
    before = _keys(specs, tmp_path)
    assert before == _keys(specs, tmp_path)  # deterministic
    path = tmp_path / edit
    path.write_bytes(path.read_bytes() + b"\n# edited\n")
    after = _keys(specs, tmp_path)
    assert {s for s in before if before[s] != after[s]} == changed


def test_merkle_key_tracks_own_params_and_upstream_params_only(tmp_path):
    specs = _project(tmp_path)
    before = _keys(specs, tmp_path)
    (tmp_path / "params.yaml").write_text("p:\n  a: 1\n  b: 3\n")
    after_b = _keys(specs, tmp_path)
    assert after_b["a"] == before["a"] and after_b["b"] != before["b"]
    (tmp_path / "params.yaml").write_text("p:\n  a: 5\n  b: 3\n")
    after_a = _keys(specs, tmp_path)
    assert after_a["a"] != after_b["a"] and after_a["b"] != after_b["b"]


def test_merkle_key_names_its_parts_and_no_version_string(tmp_path):
    specs = _project(tmp_path)
    keys = stage_keys(specs, tmp_path, Hasher())
    assert set(keys["a"].parts) == {"cmd", "code", "params", "upstream", "data"}
    assert sorted(keys["a"].parts["code"]) == ["lib/__init__.py", "lib/util.py", "stages/a.py"]
    assert keys["b"].parts["upstream"] == {"out_a": keys["a"].key} and keys["b"].parts["data"] == {}
    assert "version" not in str(keys["a"].parts)


def test_stage_key_fails_loudly_on_missing_input(tmp_path):
    specs = _project(tmp_path)
    (tmp_path / "data" / "x.bin").unlink()
    (tmp_path / "data").rmdir()
    with pytest.raises(FileNotFoundError, match="data not found: stage a reads it"):
        _keys(specs, tmp_path)


def test_verify_finds_a_flipped_byte_and_a_missing_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"\x00" * 64)
    (out / "b.bin").write_bytes(b"\x01" * 64)
    recorded = manifest(["out"], tmp_path, Hasher())
    assert sorted(recorded) == ["out/a.bin", "out/b.bin"] and verify(recorded, tmp_path) == []
    data = bytearray((out / "a.bin").read_bytes())
    data[10] ^= 0xFF
    (out / "a.bin").write_bytes(bytes(data))
    (out / "b.bin").unlink()
    assert verify(recorded, tmp_path) == ["out/a.bin", "out/b.bin"]


def test_store_takes_dvcs_own_remote_settings_and_saves_no_credential(tmp_path, monkeypatch):
    """The flow's store is built from the filesystem arguments DVC uses for the remote: options a user set for
    DVC (profile, TLS bundle, encryption, SSH port/user/key) reach it; credentials go to the environment, never
    into the settings a Prefect block saves; a credential with no such channel is refused in one line."""
    import json
    import subprocess

    from fewstep.pipeline.store import StoreError, from_dvc

    monkeypatch.delenv("FEWSTEP_CACHE_DIR", raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "")  # recorded, so what DVC's S3 plugin exports is undone after the test
        monkeypatch.delenv(name)

    def dvc(*args):
        subprocess.run(["dvc", *args], cwd=tmp_path, check=True, capture_output=True)

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    dvc("remote", "add", "-d", "team", "s3://bucket/dvc")
    for key, value in (("endpointurl", "http://127.0.0.1:9"), ("profile", "team-profile"), ("ssl_verify", "/ca.pem"),
                       ("sse", "AES256"), ("credentialpath", "/creds"), ("read_timeout", "300")):
        dvc("remote", "modify", "team", key, value)
    dvc("remote", "modify", "--local", "team", "access_key_id", "AK")
    dvc("remote", "modify", "--local", "team", "secret_access_key", "SK")
    store = from_dvc(tmp_path)
    saved = json.dumps(store.settings)  # what the results block holds on the Prefect server
    assert store.url == "s3://bucket/dvc/fewstep" and "AK" not in saved and "SK" not in saved
    assert store.settings["profile"] == "team-profile"
    assert store.settings["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "verify": "/ca.pem"}
    assert store.settings["s3_additional_kwargs"] == {"ServerSideEncryption": "AES256"}
    assert store.settings["config_kwargs"]["read_timeout"] == 300  # the user's, over our short default
    assert store.secrets == {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
                             "AWS_SHARED_CREDENTIALS_FILE": "/creds"}

    dvc("remote", "add", "-d", "box", "ssh://alice@127.0.0.1:2222/srv/dvc")
    dvc("remote", "modify", "box", "keyfile", "/keys/id")
    store = from_dvc(tmp_path)
    assert store.url == "ssh://127.0.0.1:2222/srv/dvc/fewstep"
    assert {k: store.settings[k] for k in ("host", "port", "username", "client_keys")} == {
        "host": "127.0.0.1", "port": 2222, "username": "alice", "client_keys": ["/keys/id"]}
    json.dumps(store.settings)  # DVC's interactive client class is not carried
    dvc("remote", "modify", "--local", "box", "password", "pw")
    with pytest.raises(StoreError, match=r"^DVC remote 'box': the flow's store cannot use an SSH password: use "):
        from_dvc(tmp_path)


def test_reproduce_reports_what_dvc_did_with_the_stage(tmp_path):
    """Through DVC's Python API: a first run runs the command; a rerun finds it current; after a param edit
    and back, DVC restores the earlier outputs from its run-cache without running; --force runs; a failing
    command is one line with DVC's reason."""
    import subprocess

    from fewstep.pipeline.stagerun import StageError, reproduce

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("n: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  make:\n    cmd: python -c \"import yaml; n = yaml.safe_load(open('params.yaml'))['n']; "
        "open('out.txt', 'w').write(str(n)); open('runs.log', 'a').write('run\\n')\"\n"
        "    params: [n]\n    outs: [out.txt]\n"
        "  broken:\n    cmd: python -c \"raise SystemExit(3)\"\n    outs: [never.txt]\n")
    spec = StageSpec("make", "", [], ["n"], "params.yaml", ["out.txt"])
    lines = []

    def runs() -> int:
        return (tmp_path / "runs.log").read_text().count("run")

    assert reproduce(tmp_path, spec, log=lines.append) == "ran" and runs() == 1
    assert any("Running stage 'make'" in line for line in lines)  # DVC's own lines reach the log
    assert reproduce(tmp_path, spec) == "current" and runs() == 1
    (tmp_path / "params.yaml").write_text("n: 2\n")
    assert reproduce(tmp_path, spec) == "ran" and runs() == 2
    (tmp_path / "params.yaml").write_text("n: 1\n")
    lines.clear()
    assert reproduce(tmp_path, spec, log=lines.append) == "restored" and runs() == 2
    assert (tmp_path / "out.txt").read_text() == "1"
    assert sum("is cached - skipping run" in line for line in lines) == 1  # said once, by the restore itself
    assert reproduce(tmp_path, spec, force=True) == "ran" and runs() == 3
    broken = StageSpec("broken", "", [], [], "params.yaml", ["never.txt"])
    with pytest.raises(StageError, match=r"^stage broken: dvc repro failed: failed to reproduce 'broken': "
                                         r"failed to run: .*exited with 3$"):
        reproduce(tmp_path, broken)
