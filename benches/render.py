"""Render bench results: ``python benches/render.py RESULTS.json [...] [--out DIR]``.

Writes ``DIR/benches.md`` (one table per op: case, mode, provider, median and p20-p80 ms,
TFLOP/s or GB/s, ratio to the floor and to each peer) and ``DIR/<op>.png`` (median ms per
case and provider, log scale, the floor as a black tick).
"""
import argparse
import json
import os
from collections import defaultdict


def load(paths):
    records, machines = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machines.append(data["machine"])
        records.extend(data["records"])
    return machines, records


def _num(value, fmt):
    return "" if value is None else format(value, fmt)


def markdown(machines, records) -> str:
    lines = ["# Bench results", ""]
    for m in machines:
        lines.append(f"- {m['gpu']}: torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}; "
                     f"measured {m['measured_bandwidth_gbps']:.0f} GB/s copy, "
                     f"{m['measured_bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul")
    by_op = defaultdict(list)
    for r in records:
        by_op[r["op"]].append(r)
    for op, rows in by_op.items():
        lines += ["", f"## {op}", "",
                  "| case | mode | provider | median ms | p20-p80 ms | TFLOP/s | GB/s | x floor "
                  "| peers (their time / this) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["case"], r["mode"], r["median_ms"])):
            peers = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["ratio_vs"].items()))
            lines.append(
                f"| {r['case']} | {r['mode']} | {r['provider']} | {r['median_ms']:.4f} | "
                f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f} | {_num(r['tflops'], '.1f')} | "
                f"{_num(r['gbps'], '.0f')} | {_num(r['ratio_to_floor'], '.2f')} | {peers} |")
    return "\n".join(lines) + "\n"


def plots(records, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_op = defaultdict(list)
    for r in records:
        by_op[r["op"]].append(r)
    written = []
    for op, rows in by_op.items():
        groups = sorted({(r["case"], r["mode"]) for r in rows})
        providers = sorted({r["provider"] for r in rows})
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.5))
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, group in enumerate(groups):
                match = [r for r in rows if (r["case"], r["mode"]) == group
                         and r["provider"] == provider]
                if match:
                    xs.append(j + i * width)
                    ys.append(match[0]["median_ms"])
            ax.bar(xs, ys, width=width, label=provider)
        for j, group in enumerate(groups):
            floor = max(r["floor_ms"] for r in rows if (r["case"], r["mode"]) == group)
            if floor > 0:
                ax.hlines(floor, j - width / 2, j + 0.8 - width / 2, colors="k")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))],
                      [f"{c}\n{m}" for c, m in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (black: floor)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default=None, help="output folder (default: beside the first)")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    os.makedirs(out_dir, exist_ok=True)
    machines, records = load(args.results)
    with open(os.path.join(out_dir, "benches.md"), "w") as f:
        f.write(markdown(machines, records))
    written = plots(records, out_dir)
    print(f"wrote benches.md and {len(written)} plots to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
