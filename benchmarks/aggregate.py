"""Benchmark: our aggregation path vs Flower-style in-memory FedAvg vs a streaming-sum floor.

    make bench-aggregate        # = nice python benchmarks/aggregate.py
    # writes benchmarks/results/aggregate.json and prints a table

N safetensors updates of one model (6.3 M float32 parameters in a plausible set of tensors,
25 MB a file) are written once to a directory; every method then reads the SAME files from
that directory (page cache or disk, the same for all three), for N = 10, 40, 100, 400:

- ``ours``: the production path as the averager runs it: entries with bounded weights and
  clip scales (``sfl.learning.rules.bounds``, the default factor), ``RoundUpdates`` reading
  through a ``FileSource`` (instead of S3; everything after the bytes is the same code),
  zero-copy decode, clipping, ``in_flight`` read-ahead, the configured ``fedavg`` rule.
- ``flower``: what flwr's ``aggregate`` does: every update loaded as a list of numpy arrays,
  then each layer times its example count, summed with ``np.add`` and divided (float32).
- ``floor``: a plain streaming sum: each file read into one reused buffer, viewed as float32
  and added with its weight into a float64 sum (the arithmetic ``ours`` does), no checks.

Before each N the files are read once, untimed, so every method reads from the page cache
(at N = 400, 10 GB, the cache may not hold them all; then every method reads from disk).
Why files and not the local S3: moto over HTTP in this process moves a few hundred MB/s and
would measure the emulator; on AWS the bytes come from S3 at the network's rate, which
``in_flight`` concurrent downloads are there to fill. Each measurement runs in a fresh
subprocess; time is wall-clock of the aggregation alone (after imports and loading the base
model), and the subprocess's CPU time (user + system, imports included: on a shared machine
the steadier figure); memory is the subprocess's peak resident set (``VmHWM`` in
``/proc/self/status``; not ``ru_maxrss``, which Linux carries over from the parent across
``exec``) and the same minus the resident set just before the timed part (imports, base model).
Flower-style is skipped where its projected memory (N times 2 copies) exceeds what the
machine has free; the skip is written down.

``--model resnet18`` uses torchvision's resnet18 tensors instead (its state dict's 122 names
and shapes, 11.7 M float32 parameters and the int64 batch-norm counters, 46.8 MB a file;
built with ``weights=None``, nothing downloaded), and writes ``aggregate-resnet18.json``.
``--rule median`` (or any built-in rule) runs ``ours`` with that rule: a chunked rule first
spools every update to a temporary directory, as the averager does in ``/tmp``.

    nice -n 10 python benchmarks/aggregate.py --model resnet18 --sizes 100 --methods ours
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).parent / "results"
SIZES = (10, 40, 100, 400)
METHODS = ("floor", "ours", "flower")
PAGE = os.sysconf("SC_PAGE_SIZE")
# A plausible small CNN + MLP head, 6,302,154 float32 parameters (25.2 MB).
SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (64, 3, 3, 3),
    "conv1.bias": (64,),
    "conv2.weight": (128, 64, 3, 3),
    "conv2.bias": (128,),
    "fc1.weight": (512, 12_150),
    "fc1.bias": (512,),
    "fc2.weight": (128, 512),
    "fc2.bias": (128,),
    "out.weight": (10, 128),
    "out.bias": (10,),
}
MODELS = ("synthetic", "resnet18")
# dtypes of tensors that are not float32 (the model's counters): copied from the base as is.
DTYPES: dict[str, str] = {}


def use_model(model: str, directory: Path | None = None) -> None:
    """Replace SHAPES (and DTYPES) by a real model's state dict's names, shapes and dtypes:
    from torchvision, or (a measured child, which must not import torchvision: the averager
    does not) from the ``shapes.json`` that the parent wrote beside the updates."""
    if model == "synthetic":
        return
    shapes_file = None if directory is None else directory / "shapes.json"
    if shapes_file is not None and shapes_file.exists():
        saved = json.loads(shapes_file.read_text())
        shapes = {n: tuple(s) for n, s in saved["shapes"].items()}
        dtypes = dict(saved["dtypes"])
    else:
        import torch
        import torchvision

        state = getattr(torchvision.models, model)(weights=None).state_dict()
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        dtypes = {n: "int64" for n, t in state.items() if t.dtype != torch.float32}
    SHAPES.clear()
    SHAPES.update(shapes)
    DTYPES.clear()
    DTYPES.update(dtypes)


def float_names() -> list[str]:
    return [n for n in SHAPES if n not in DTYPES]


def file_size_bytes() -> int:
    return sum(int(np.prod(s)) * (8 if n in DTYPES else 4) for n, s in SHAPES.items())


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_resident_bytes() -> int:
    """This process's peak resident set since its ``exec`` (the kernel's high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the update files ------------------------------------------------------------------


def generate(directory: Path, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write the base model and ``count`` updates (base + noise of varied size; every 20th
    far larger, as a misbehaving client's), and the manifest the averager would have."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest: list[dict[str, Any]] = json.loads(manifest_path.read_text())
        if len(manifest) >= count:
            return manifest[:count]
    rng = np.random.default_rng(seed)
    floats = float_names()
    base = {n: rng.standard_normal(SHAPES[n], dtype=np.float32) * 0.05 for n in floats}
    counters = {n: np.zeros(SHAPES[n], dtype=np.int64) for n in DTYPES}
    base_file = str(directory / "base.safetensors")
    save_file({**base, **counters}, base_file, metadata={"format": "sfl-model/1"})
    noise = rng.standard_normal(sum(int(np.prod(SHAPES[n])) for n in floats), dtype=np.float32)
    noise_norm = float(np.linalg.norm(noise.astype(np.float64)))
    flat_base = np.concatenate([base[n].reshape(-1) for n in floats])
    manifest = []
    for i in range(count):
        size = 0.01 * (5.0 if i % 20 == 7 else float(rng.uniform(0.5, 1.5)))
        shift = int(rng.integers(0, noise.size))
        flat = flat_base + np.roll(noise, shift) * np.float32(size)  # distinct per update
        update, at = dict(counters), 0
        for name in floats:
            n = int(np.prod(SHAPES[name]))
            update[name] = flat[at : at + n].reshape(SHAPES[name])
            at += n
        key = f"updates/{i:04d}.safetensors"
        (directory / key).parent.mkdir(parents=True, exist_ok=True)
        save_file(update, str(directory / key), metadata={"format": "sfl-update/1"})
        # The change's norm as acceptance measures it (up to float32 rounding of base + delta).
        examples = int(rng.integers(20, 200))
        manifest.append({"key": key, "num_examples": examples, "delta_norm": size * noise_norm})
    manifest_path.write_text(json.dumps(manifest))
    return manifest


# --- the three methods (each in its own subprocess) -------------------------------------


def run_ours(
    directory: Path, manifest: list[dict[str, Any]], rule_name: str = "fedavg"
) -> tuple[float, int, int]:
    from sfl.core.config import FederationConfig
    from sfl.learning.codec import decode, parse_header
    from sfl.learning.rules.aggregation import build_rule
    from sfl.learning.rules.bounds import bounded_weights, clip_scale, model_norm, norm_bound
    from sfl.server.round_updates import Entry, FileSource, RoundUpdates

    config = FederationConfig(aggregation=rule_name)
    body = (directory / "base.safetensors").read_bytes()
    base, header = decode(body), parse_header(body)
    rule = build_rule(config.aggregation, config.aggregation_params)  # loads plugins: setup
    before = resident_bytes()
    started = time.perf_counter()
    weights = bounded_weights([m["num_examples"] for m in manifest], config.max_weight_ratio)
    bound = norm_bound(
        [m["delta_norm"] for m in manifest],
        factor=config.norm_bound_factor,
        absolute=config.max_update_norm,
        base_norm=model_norm(base),
    )
    entries = [
        Entry(f"c{i:04d}", m["key"], "", w, clip_scale(m["delta_norm"], bound))
        for i, (m, w) in enumerate(zip(manifest, weights, strict=True))
    ]
    with RoundUpdates(
        None,
        "",
        entries,
        base,
        header,
        source=FileSource(directory),
        in_flight=config.aggregation_in_flight,
    ) as updates:
        result = rule.aggregate(base, updates, None)
        assert result is not None and len(updates.read) == len(entries), updates.excluded
    clipped = sum(e.scale < 1 for e in entries)
    return time.perf_counter() - started, before, clipped


def run_flower(directory: Path, manifest: list[dict[str, Any]]) -> tuple[float, int, int]:
    from safetensors.numpy import load

    from sfl.core.config import FederationConfig
    from sfl.learning.rules.bounds import bounded_weights

    config = FederationConfig()
    before = resident_bytes()
    started = time.perf_counter()
    counts = bounded_weights([m["num_examples"] for m in manifest], config.max_weight_ratio)
    # Flower: results as (list of ndarrays, num_examples), all in memory ...
    results = []
    for m, n in zip(manifest, counts, strict=True):
        arrays = load((directory / m["key"]).read_bytes())
        results.append(([arrays[name] for name in float_names()], n))
    # ... then its aggregate(): weighted copies of every layer, summed, divided.
    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in layers] for layers, n in results]
    averaged = [reduce(np.add, per_layer) / total for per_layer in zip(*weighted, strict=True)]
    assert len(averaged) == len(float_names())
    return time.perf_counter() - started, before, 0


def run_floor(directory: Path, manifest: list[dict[str, Any]]) -> tuple[float, int, int]:
    from sfl.core.config import FederationConfig
    from sfl.learning.rules.bounds import bounded_weights

    config = FederationConfig()
    before = resident_bytes()
    started = time.perf_counter()
    weights = bounded_weights([m["num_examples"] for m in manifest], config.max_weight_ratio)
    first = directory / manifest[0]["key"]
    buffer = bytearray(first.stat().st_size)
    with first.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    # Every float32 tensor's place in the data section (the counters are skipped).
    spans = [
        (v["data_offsets"][0] // 4, v["data_offsets"][1] // 4)
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] == "F32"
    ]
    total = np.zeros(sum(b - a for a, b in spans), dtype=np.float64)
    block = 64 * 1024
    scratch = np.empty(block, dtype=np.float64)
    for m, w in zip(manifest, weights, strict=True):
        with (directory / m["key"]).open("rb", buffering=0) as f:
            f.readinto(buffer)
        data = np.frombuffer(buffer, dtype=np.float32, offset=8 + header_len)
        into = 0
        for a, b in spans:
            values = data[a:b]
            for at in range(0, values.size, block):
                part = values[at : at + block]
                out = total[into + at : into + at + part.size]
                np.multiply(part, w, out=scratch[: part.size])
                np.add(out, scratch[: part.size], out=out)
            into += values.size
    mean = total / sum(weights)
    assert mean.size == into
    return time.perf_counter() - started, before, 0


def child(method: str, directory: Path, n: int, model: str, rule: str) -> None:
    use_model(model, directory)
    manifest = json.loads((directory / "manifest.json").read_text())[:n]
    if method == "ours":
        seconds, before, clipped = run_ours(directory, manifest, rule)
    else:
        runner = {"flower": run_flower, "floor": run_floor}[method]
        seconds, before, clipped = runner(directory, manifest)
    peak = peak_resident_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process, imports included
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_bytes": peak,
                "rss_before_bytes": before,
                "peak_above_before_bytes": peak - before,
                "clipped": clipped,
            }
        )
    )


# --- the run ----------------------------------------------------------------------------


def measure(method: str, directory: Path, n: int, model: str, rule: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--child", method, "--dir", str(directory)),
            *("--n", str(n), "--model", model, "--rule", rule),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "sfl-bench-aggregate"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="best of (a shared machine)")
    parser.add_argument("--keep", action="store_true", help="keep the update files")
    parser.add_argument("--model", choices=MODELS, default="synthetic", help="tensor shapes")
    parser.add_argument("--rule", default="fedavg", help="the rule 'ours' runs (built-in name)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.n, args.model, args.rule)
        return
    if args.model != "synthetic" and args.dir == parser.get_default("dir"):
        args.dir = args.dir.with_name(f"{args.dir.name}-{args.model}")
    suffix = (
        ""
        if (args.model, args.rule) == ("synthetic", "fedavg")
        else (
            "-" + "-".join(p for p in (args.model, args.rule) if p not in ("synthetic", "fedavg"))
        )
    )
    use_model(args.model)
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "shapes.json").write_text(json.dumps({"shapes": SHAPES, "dtypes": DTYPES}))
    results = RESULTS_DIR / f"aggregate{suffix}.json"
    table = RESULTS_DIR / f"aggregate{suffix}.md"

    file_bytes = file_size_bytes()
    largest = max(args.sizes)
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    fits = int((free - 2 * 1024**3) // (file_bytes + 4096))
    if fits < largest:
        print(f"disk: {free / 1e9:.1f} GB free, {fits} files fit; sizes above are not measured")
    sizes = [n for n in args.sizes if n <= fits]
    t0 = time.perf_counter()
    generate(args.dir, max(sizes))
    print(f"{max(sizes)} update files in {args.dir} ({time.perf_counter() - t0:.0f} s)")

    rows: list[dict[str, Any]] = []
    manifest = json.loads((args.dir / "manifest.json").read_text())
    for n in sizes:
        _warm(args.dir, manifest[:n])  # every method then reads from the same page cache
        for method in args.methods:
            projected = 2.2 * n * file_bytes if method == "flower" else 0
            if projected and projected > 0.8 * available_bytes():
                rows.append(
                    {
                        "method": method,
                        "n": n,
                        "skipped": f"needs ~{projected / 1e9:.1f} GB, "
                        f"{available_bytes() / 1e9:.1f} GB available",
                    }
                )
                print(f"N={n:4d} {method:7s} skipped ({rows[-1]['skipped']})")
                continue
            runs = [
                measure(method, args.dir, n, args.model, args.rule) for _ in range(args.repeats)
            ]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append(
                {"method": method, "n": n, **best, "all_seconds": [r["seconds"] for r in runs]}
            )
            print(
                f"N={n:4d} {method:7s} {best['seconds']:7.2f} s "
                f"(CPU {best['cpu_seconds']:.0f} s with imports) "
                f"peak {best['peak_rss_bytes'] / 1e6:7.0f} MB "
                f"(+{best['peak_above_before_bytes'] / 1e6:.0f} MB)"
            )
    summary = _summary(rows, sizes)
    result = {
        "benchmark": "aggregate",
        "command": " ".join(["benchmarks/aggregate.py", *sys.argv[1:]]),
        "model": args.model,
        "rule_of_ours": args.rule,
        "parameters": sum(int(np.prod(SHAPES[n])) for n in float_names()),
        "file_bytes": file_bytes,
        "sizes": sizes,
        "repeats": args.repeats,
        "bytes_from": "local files (page cache), the same files for every method",
        "memory": "peak_rss_bytes: VmHWM of a fresh subprocess per measurement; "
        "peak_above_before_bytes: minus the resident set just before the timed part",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "rows": rows,
        "summary": summary,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    table.write_text(_table(rows, summary) + "\n")
    print(_table(rows, summary))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def _warm(directory: Path, manifest: list[dict[str, Any]]) -> None:
    """Read the files once (untimed), so that no method pays the first read from disk."""
    buffer = bytearray(1024 * 1024)
    for m in manifest:
        with (directory / m["key"]).open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _summary(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        by = {r["method"]: r for r in rows if r["n"] == n and "seconds" in r}
        if "ours" not in by:
            continue
        entry: dict[str, Any] = {}
        if "flower" in by:
            entry["speedup_vs_flower"] = by["flower"]["seconds"] / by["ours"]["seconds"]
        if "floor" in by:
            entry["ours_over_floor"] = by["ours"]["seconds"] / by["floor"]["seconds"]
        out[str(n)] = entry
    return out


def _table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "| N | method | seconds | peak RSS (MB) | peak above start (MB) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['method']} | skipped: {r['skipped']} | | |")
            continue
        lines.append(
            f"| {r['n']} | {r['method']} | {r['seconds']:.2f} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_above_before_bytes'] / 1e6:.0f} |"
        )
    lines.append("")
    for n, s in summary.items():
        parts = [f"{k} {v:.2f}x" for k, v in s.items()]
        lines.append(f"- N={n}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
