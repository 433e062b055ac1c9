"""Cache benchmarks: xxh3-128 vs md5 throughput, no-op `dvc repro` time, fully cached flow run time.

    python bench/cache.py [--gib 1] [--skip-pipeline]

The pipeline timings need the default pipeline already reproduced (`dvc repro`) and, for the flow,
one prior flow run that filled the cache (`python flows/distill.py`). Prints JSON and a markdown table
and writes both to bench/results/cache.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import xxhash

ROOT = Path(__file__).resolve().parents[1]


def throughput(make_hasher, data: bytes, total: int) -> float:
    """GiB/s of hashing `total` bytes fed in `data`-sized chunks."""
    h = make_hasher()
    start = time.perf_counter()
    for _ in range(total // len(data)):
        h.update(data)
    h.digest()
    return total / (time.perf_counter() - start) / 2**30


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="bytes hashed per algorithm, in GiB (>= 1 for the report)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the hashing benchmark")
    args = ap.parse_args()
    chunk = os.urandom(16 * 2**20)
    total = int(args.gib * 2**30) // len(chunk) * len(chunk)
    results = {"bytes_hashed": total,
               "xxh3_128_gib_s": throughput(xxhash.xxh3_128, chunk, total),
               "md5_gib_s": throughput(hashlib.md5, chunk, total)}
    results["xxh3_over_md5"] = results["xxh3_128_gib_s"] / results["md5_gib_s"]
    if not args.skip_pipeline:
        results["noop_dvc_repro_s"], _ = timed(["dvc", "repro"])
        wall, log = timed([sys.executable, "flows/distill.py"])
        flow_time = re.search(r"stages in ([0-9.]+) s of flow time", log)
        assert flow_time and '"computed"' not in log, f"the flow was not fully cached:\n{log[-2000:]}"
        results["cached_flow_time_s"] = float(flow_time.group(1))
        results["cached_flow_process_s"] = wall  # + interpreter, imports and Prefect (server) start-up
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    table = "\n".join(["| measure | value |", "|---|---|", *rows])
    (out / "cache.md").write_text(table + "\n")
    print(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
