"""inputs: content digests of the optional local paths that params name (evaluate.clip_path, the FID featurizer,
reference and benchmark folders), so the stages that read them rerun when a file changes. DVC runs it every
time (always_changed: it cannot list a dep that exists only when a param is set); it costs a stat per file
once the digests are memoized. Writes <out>/<section>.json per params section with such keys. First it checks
that every input no stage produces (the teacher's weights, the prompts) exists: one line if not, as the flow says
it; <out>/external.json lists them (paths only: DVC hashes their contents as the deps of the stages that read them)."""
import json
from pathlib import Path

from fewstep.pipeline.keys import external_inputs, missing_input, stage_specs
from fewstep.errors import DataError
from fewstep.pipeline.hashing import Hasher
from fewstep.pipeline.inputs import declared, record
from fewstep.files import atomic_output


def main(params, args, device):
    # DVC runs this stage first: a missing teacher or prompts folder is one line here, as the flow says it, not
    # DVC's own error from the first stage that lists it
    pipeline = Path(args.params).absolute().parent  # pipelines/<name>: the repository is two folders up
    specs = stage_specs(pipeline.parents[1], (pipeline / "dvc.yaml").relative_to(pipeline.parents[1]).as_posix())
    missing = missing_input(specs, pipeline.parents[1])
    if missing is not None:
        raise DataError(str(missing))
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
        # encode lists this file, so DVC runs this stage (and its check above) before anything reads the inputs
        (out / "external.json").write_text(json.dumps(external_inputs(specs), indent=2) + "\n")


def configure(ap):
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("inputs", main, configure)
