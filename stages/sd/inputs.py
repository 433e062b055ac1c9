"""inputs: content digests of the optional local paths that params name (evaluate.clip_path, the FID featurizer,
reference and benchmark folders), so the stages that read them rerun when a file changes. DVC runs it every
time (always_changed: it cannot list a dep that exists only when a param is set); it costs a stat per file
once the digests are memoized. Writes <out>/<section>.json per params section with such keys."""
import json
from pathlib import Path

from fewstep.hashing import Hasher
from fewstep.inputs import declared, record
from fewstep.io import atomic_output


def main(params, args, device):
    hasher = Hasher(Path(".fewstep") / "hash-memo.json")
    inputs = record(params, ".", hasher)
    hasher.save()
    for key, entry in inputs.items():
        print(f"[inputs] {key}: {entry['path']} xxh3 {entry['xxh3']}", flush=True)
    if not inputs:
        print("[inputs] no optional inputs set", flush=True)
    with atomic_output(args.out) as out:  # one file per section, so a stage reruns for its own inputs only
        out.mkdir()
        for section in sorted({key.split(".")[0] for key in declared(params)}):
            mine = {k: v for k, v in inputs.items() if k.split(".")[0] == section}
            (out / f"{section}.json").write_text(json.dumps(mine, indent=2, sort_keys=True) + "\n")


def configure(ap):
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("inputs", main, configure)
