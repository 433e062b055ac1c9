"""Content addressing: xxh3 digests, memoization, stage keys from DVC's graph, manifest verification."""
import hashlib
import os

import pytest
import xxhash

from conftest import ROOT
from fewstep.cache import Hasher, file_digest, manifest, stage_key, stage_specs, verify


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
    f.write_bytes(b"two")  # new content, new size: the memo must not answer
    assert Hasher(memo).file(f) != first
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
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(b"abc")
    (tmp_path / "params.yaml").write_text("distill:\n  lr: 0.1\nteacher:\n  steps: 3\n")
    from fewstep.cache import StageSpec

    return StageSpec("s", "python code.py", ["code.py", "data"], ["distill.lr"], "params.yaml", ["out"])


def test_stage_key_tracks_code_data_and_own_params(tmp_path):
    spec = _project(tmp_path)
    key = stage_key(spec, tmp_path, Hasher())
    assert key == stage_key(spec, tmp_path, Hasher())
    (tmp_path / "params.yaml").write_text("distill:\n  lr: 0.1\nteacher:\n  steps: 4\n")
    assert stage_key(spec, tmp_path, Hasher()) == key  # another stage's params: same key
    (tmp_path / "params.yaml").write_text("distill:\n  lr: 0.2\nteacher:\n  steps: 4\n")
    changed = stage_key(spec, tmp_path, Hasher())
    assert changed != key
    (tmp_path / "data" / "x.bin").write_bytes(b"abd")
    assert stage_key(spec, tmp_path, Hasher()) not in (key, changed)


def test_stage_key_fails_loudly_on_missing_dependency(tmp_path):
    spec = _project(tmp_path)
    (tmp_path / "code.py").unlink()
    with pytest.raises(FileNotFoundError, match="code.py"):
        stage_key(spec, tmp_path, Hasher())


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
