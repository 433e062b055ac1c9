"""The `fewstep` command: sample a saved teacher or student into a grid PNG; check or write the stage
dependencies that the code's imports imply; render DVC's plots as an offline page; compare two models."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(ValueError):
    """A bad command-line argument, phrased as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`fewstep sample: error: ...`) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def sample(args) -> None:
    import torch
    from PIL import Image

    from fewstep.core.grid import save_grid
    from fewstep.files import atomic_output
    from fewstep.families.edm.unet import load_model
    from fewstep.core.sampling import nfe, sample_model

    if args.out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out must name an image file (e.g. grid.png), got {str(args.out)!r}")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist (create it, or write elsewhere)")
    if args.model.is_dir() and not (args.model / "fewstep.json").is_file():
        inside = sorted(d for d in args.model.iterdir() if (d / "fewstep.json").is_file())
        if inside:  # a stage's output folder (teacher/) holds the model (teacher/model)
            raise UsageError(f"--model {args.model} is a stage output folder; the model in it is "
                             f"{' or '.join(str(d) for d in inside)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available (use cpu)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device must be a torch device such as cpu or cuda, got {args.device!r}") from None
    model, info = load_model(args.model, device)
    if info["role"] not in ("teacher", "student"):
        raise UsageError(f"--model {args.model} is a {info['role']}, not a teacher or student model")
    trained = len(info.get("student_sigmas", []))
    if info["role"] == "student" and args.steps is not None and trained % args.steps:
        fits = [k for k in range(1, trained + 1) if trained % k == 0]
        raise UsageError(f"--steps must divide the {trained}-step student's steps ({', '.join(map(str, fits))}) "
                         f"for {args.model}, got {args.steps}")
    if args.label is not None and not 0 <= args.label < model.num_classes:
        raise UsageError(f"--label must be in [0, {model.num_classes - 1}] for {args.model}, got {args.label}")
    gen = torch.Generator().manual_seed(args.seed)
    c, size = model.unet.config.in_channels, model.unet.config.sample_size
    n = args.rows * args.rows
    labels = torch.arange(n) % model.num_classes if args.label is None else torch.full((n,), args.label)
    noise = torch.randn((n, c, size, size), generator=gen)
    images = sample_model(model, info, noise.to(device), labels.to(device), args.steps, gen)
    with atomic_output(args.out) as out:
        save_grid(images, out, nrow=args.rows)
    print(f"{info['role']} {args.model}: {n} samples, {nfe(info, args.steps)} NFE -> {args.out}")


def compare(args) -> int:
    """`fewstep compare A B`: both models on the same noise and labels, a grid and a metrics table."""
    from fewstep.families.edm.compare import compare as run_compare
    from fewstep.io import ArtifactError
    from fewstep.files import atomic_output
    from fewstep.params import ParamsError

    for path, what in ((args.prepare / "featurizer", "--prepare"), (args.out.parent, "--out's folder")):
        if not path.exists():
            print(f"fewstep compare: error: {what} {path} does not exist"
                  + (" (run the prepare stage: dvc repro prepare)" if what == "--prepare" else ""), file=sys.stderr)
            return 1
    try:
        table = run_compare(args.a, args.b, args.prepare, args.out, seeds=args.seeds, samples=args.samples,
                            rows=args.rows, seed=args.seed, device=args.device)
    except (ArtifactError, ParamsError) as exc:
        print(f"fewstep compare: error: {exc}", file=sys.stderr)
        return 1
    if args.table is not None:
        with atomic_output(args.table) as out:
            out.write_text(table)
    print(table + f"grid -> {args.out}" + (f", table -> {args.table}" if args.table else ""))
    return 0


def plots(args) -> int:
    """`fewstep plots`: DVC's plots as one self-contained HTML page. `dvc plots show` draws its charts with
    Vega from a CDN, so offline only its images appear; here vl-convert renders each chart to SVG locally."""
    import base64
    import html
    import json
    import subprocess

    from fewstep.files import atomic_output

    project = args.project
    proc = subprocess.run(["dvc", "plots", "show", "--json"], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1].removeprefix("ERROR: ")
        print(f"fewstep plots: error: dvc plots show failed in {project}: {reason}", file=sys.stderr)
        return 1
    import vl_convert

    sections = []
    for name, entries in (json.loads(proc.stdout).get("data") or {}).items():
        for entry in entries:
            if entry["type"] == "vega":
                body = vl_convert.vegalite_to_svg(entry["content"])
            elif entry["type"] == "image":
                png = base64.b64encode(Path(entry["url"]).read_bytes()).decode()
                body = f'<img src="data:image/png;base64,{png}" alt="{html.escape(name)}">'
            else:
                continue
            sections.append(f"<section><h2>{html.escape(name)}</h2>{body}</section>")
    if not sections:
        print(f"fewstep plots: error: no plots in {project} (run the pipeline first: dvc repro)", file=sys.stderr)
        return 1
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fewstep plots</title></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    out = project / args.out if not args.out.is_absolute() else args.out
    with atomic_output(out) as tmp:
        tmp.write_text(page)
    print(f"{len(sections)} plots -> {out}")
    return 0


def checkout(args) -> int:
    """`fewstep checkout`: every stage back to dvc.lock from this machine's caches, computing nothing."""
    from fewstep.pipeline.wayback import checkout as restore

    if not (args.project / "dvc.yaml").exists():
        print(f"fewstep checkout: error: {args.project} holds no dvc.yaml (the root, or pipelines/<name>)",
              file=sys.stderr)
        return 1
    results = restore(args.project)
    for result in results:
        print(result.line())
    kept = [r.stage for r in results if r.source == "kept"]
    if kept:
        print(f"fewstep checkout: {', '.join(kept)} not restored (their outputs are as before); `dvc repro` "
              f"recomputes them", file=sys.stderr)
        return 1
    if any(r.source == "run-cache" for r in results):
        print("dvc.lock now names this machine's outputs (`git diff dvc.lock`: where another machine type's differ).\n"
              "Commit it to make them the baseline here.")
    return 0


def deps(args) -> int:
    """`fewstep deps --check`: one line per stage whose code deps differ from its import closure (exit 1);
    `--write`: rewrite them."""
    from fewstep.pipeline.deps import DepsError, check, pipeline_files, write

    root = Path.cwd()
    files = [Path(f) for f in args.dvcfiles] or pipeline_files(root)
    for f in files:
        if not (root / f).is_file():
            print(f"fewstep deps: error: {f}: no such dvc.yaml", file=sys.stderr)
            return 2
    try:
        if args.write:
            changed = write(root, files)
            print(f"rewrote the code deps of {', '.join(changed)}" if changed else "deps already match the imports")
            return 0
        problems = check(root, files)
    except DepsError as exc:
        print(f"fewstep deps: error: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} stage dependencies differ from the code's imports; fix with: fewstep deps --write",
              file=sys.stderr)
        return 1
    print(f"deps match the imports in {', '.join(Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files)}")
    return 0


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line: the parser and the sub-commands' parsers (whose `error` names the sub-command)."""
    parser = _Parser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("sample", help="write a grid of samples from a saved teacher or student")
    s.add_argument("--model", type=Path, required=True,
                   help="a model directory: teacher/model, distill/student or finetune/student")
    s.add_argument("--steps", type=int, default=None,
                   help="sampling steps (teacher: Heun steps, NFE = 2N-1, default its trajectories' steps; "
                        "student: a divisor of its trained steps, default all of them)")
    s.add_argument("--out", type=Path, default=Path("grid.png"), help="the PNG to write; its folder must exist (default: %(default)s)")
    s.add_argument("--rows", type=int, default=10, help="the grid is rows x rows (default: %(default)s)")
    s.add_argument("--label", type=int, default=None, help="one class for every sample (default: one class per column)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise; same seed, same grid (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    d = sub.add_parser("deps", help="check (default) or rewrite each stage's code deps from its imports")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report differences and exit 1 (default)")
    mode.add_argument("--write", action="store_true", help="rewrite the deps lists in place")
    d.add_argument("dvcfiles", nargs="*", help="dvc.yaml files (default: dvc.yaml and pipelines/*/dvc.yaml)")
    c = sub.add_parser("compare", help="two model directories side by side: same noise and labels, a grid "
                                         "and a metrics table with 95%% intervals")
    c.add_argument("a", type=Path, help="a model directory, e.g. teacher/model")
    c.add_argument("b", type=Path, help="another, e.g. finetune/student")
    c.add_argument("--prepare", type=Path, default=Path("prepare"),
                   help="the prepare stage's output: featurizer and held-out images (default: %(default)s)")
    c.add_argument("--out", type=Path, default=Path("compare.png"), help="the grid: A's row above B's (default: %(default)s)")
    c.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    c.add_argument("--seeds", type=int, default=3, help="sampling seeds the intervals span (default: %(default)s)")
    c.add_argument("--samples", type=int, default=2000, help="samples per model and seed (default: %(default)s)")
    c.add_argument("--rows", type=int, default=5, help="row pairs in the grid (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    k = sub.add_parser("checkout", help="the way back: every stage's outputs as dvc.lock says, from dvc.lock's "
                                        "hashes or this machine's own run of the same code and params; never "
                                        "recomputes, never deletes")
    k.add_argument("--project", type=Path, default=Path("."),
                   help="the DVC project: the root, or pipelines/<name> (default: %(default)s)")
    p = sub.add_parser("plots", help="write DVC's plots as one offline HTML page (charts as SVG, no CDN)")
    p.add_argument("--project", type=Path, default=Path("."),
                   help="the DVC project: the root, or pipelines/<name> (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("dvc_plots/offline.html"),
                   help="the page to write, relative to the project (default: %(default)s)")
    return parser, {"sample": s, "compare": c}


def main(argv: list[str] | None = None) -> None:
    parser, commands = _parser()
    s, c = commands["sample"], commands["compare"]
    args = parser.parse_args(argv)
    if args.command == "deps":
        sys.exit(deps(args))
    if args.command == "plots":
        sys.exit(plots(args))
    if args.command == "checkout":
        sys.exit(checkout(args))
    if args.command == "compare":
        from fewstep.families.edm.compare import count_problem

        if args.rows < 1:
            c.error(f"--rows must be >= 1, got {args.rows}")
        if problem := count_problem(args.seeds, args.samples):
            c.error(problem)
        sys.exit(compare(args))
    for name in ("steps", "rows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            s.error(f"--{name} must be >= 1, got {value}")
    if args.seed < 0:
        s.error(f"--seed must be >= 0, got {args.seed}")
    from fewstep.io import ArtifactError

    try:
        sample(args)
    except (ArtifactError, UsageError) as exc:
        print(f"fewstep sample: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
