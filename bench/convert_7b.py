"""Benchmark: convert a random checkpoint of the full BlueLM-7B shape; report wall time and peak RSS.

    python bench/convert_7b.py [--workdir /tmp/bluelm-7b-bench] [--shards 2] [--keep]
                               [--quantize none int8 int4]

Writes a bfloat16 Hugging Face directory (config.json of BlueLM-7B-Base, sharded
safetensors with their index like the release, a placeholder tokenizer.model) without ever
holding more than one ~128 MB random pool in memory, then runs
`python -m convert.hf_to_flax` under `/usr/bin/time -v` and compares its peak resident
memory with the 3 GB target. Needs ~30 GB of free disk (15 GB input + 15 GB output);
both are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bluelm_jax.config import BlueLMConfig, preset  # noqa: E402
from bluelm_jax.params import hf_tensors  # noqa: E402

TARGET_RSS_GB = 3.0
POOL_ELEMENTS = 64 * 1024 * 1024  # 128 MB of bfloat16 random values, reused with shifting offsets


def write_random_checkpoint(directory: str, shards: int, seed: int = 0, config: BlueLMConfig | None = None) -> int:
    """Writes a random bfloat16 checkpoint (default: BlueLM-7B's shape) in Hugging Face layout; returns its bytes."""
    config = config or preset("bluelm-7b-base")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(b"placeholder: the converter copies tokenizer.model without reading it\n")

    tensors = [(t.hf_name, t.hf_shape) for t in hf_tensors(config)]
    total = sum(math.prod(s) * 2 for _, s in tensors)
    per_shard = math.ceil(total / shards)
    groups, current, size = [], [], 0
    for name, shape in tensors:  # consecutive groups of about total/shards bytes, in state-dict order
        if current and size + math.prod(shape) * 2 > per_shard and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += math.prod(shape) * 2
    groups.append(current)

    pool = (np.random.default_rng(seed).standard_normal(POOL_ELEMENTS, dtype=np.float32) * 0.02)
    pool = pool.astype(ml_dtypes.bfloat16).view(np.uint8)
    weight_map, shift = {}, 0
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in group:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = filename
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in group:
                left = math.prod(shape) * 2
                while left:
                    shift = (shift + 4098) % (pool.size // 2)
                    n = min(left, pool.size - shift)
                    f.write(pool[shift:shift + n].data)
                    left -= n
        print(f"  wrote {filename} ({offset / 1e9:.2f} GB, {len(group)} tensors)", flush=True)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def run_converter(hf_dir: str, out_dir: str, quantize: str = "none") -> dict:
    """Runs the converter CLI under /usr/bin/time -v; returns wall seconds, peak RSS and its output."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "convert.hf_to_flax", "--hf-dir", hf_dir, "--out", out_dir,
           "--no-progress"] + ([] if quantize == "none" else ["--quantize", quantize])
    print("  $ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - start
    rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or rss_kb is None:
        sys.exit(f"converter failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return {"wall_s": wall, "peak_rss_gb": int(rss_kb.group(1)) * 1024 / 1e9, "stdout": proc.stdout.strip(),
            "time_v": proc.stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bluelm-7b-bench")
    parser.add_argument("--shards", type=int, default=2, help="safetensors shards (the release uses 2)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--quantize", nargs="+", default=["none"], choices=("none", "int8", "int4"),
                        help="convert once per kind: none (bfloat16 as stored), int8, int4 (default: none)")
    args = parser.parse_args()
    if not os.path.exists("/usr/bin/time"):
        sys.exit("/usr/bin/time is missing (apt-get install time)")
    hf_dir, out_dir = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "converted")
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        start = time.perf_counter()
        print(f"writing a random BlueLM-7B checkpoint into {hf_dir}", flush=True)
        total = write_random_checkpoint(hf_dir, args.shards)
        print(f"  {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        for kind in args.quantize:
            out = f"{out_dir}-{kind}"
            result = run_converter(hf_dir, out, kind)
            out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
            print(f"  {result['stdout']}")
            print(f"[{kind}] converter wall time: {result['wall_s']:.1f} s ({total / 1e9 / result['wall_s']:.2f} GB/s)")
            print(f"[{kind}] converter peak RSS:  {result['peak_rss_gb']:.2f} GB (target <= {TARGET_RSS_GB:.1f} GB: "
                  f"{'met' if result['peak_rss_gb'] <= TARGET_RSS_GB else 'MISSED'})")
            print(f"[{kind}] output on disk:      {out_bytes / 1e9:.2f} GB", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
