"""REPORT.md of one results folder: ``python benches/report.py DIR``.

Reads what the bench runs wrote into DIR and renders one report beside them:

* ``benches.json`` (the kernel benches, ``benches/gpu_check.sh``): every op's cases
  against its peers and its floor, the tables and plots of :mod:`benches.render`;
* ``e2e_gpt2.json`` (``benches/e2e_gpt2.py``): the trainer against the nanoGPT-style
  loop: tokens/s, peak memory, MFU, the ratios, the loss curves (``e2e_loss.png``),
  tokens/s per log window (``e2e_tok_s.png``) and GPU kernel time per step by category;
* any other ``*.json`` with a ``machine`` entry: listed with its top-level numbers.

Parts that are missing are named in the report rather than skipped silently.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches import render  # noqa: E402


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def e2e_section(data: dict, out_dir: str) -> list:
    shape, variants = data["shape"], data["variants"]
    lines = ["## End to end: GPT-2 training step", "",
             f"- {data['machine']['gpu']}, torch {data['machine']['torch']}, triton "
             f"{data['machine']['triton']}; preset {shape['preset']} "
             f"({shape['params_non_embedding'] / 1e6:.1f}M non-embedding parameters), batch "
             f"{shape['batch']} x {shape['seq']} tokens, vocabulary {shape['vocab']}, "
             f"{shape['steps']} steps, bf16",
             f"- bf16 matmul measured at {data['matmul_tflops_measured']:.0f} TFLOP/s "
             f"(8192^3 torch.mm; datasheet {data['datasheet_tflops']:.0f})", "",
             "| variant | tokens/s | peak GB | MFU (measured matmul peak) | MFU (datasheet) "
             "| GPU util % | final window loss |", "|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        if "error" in v:
            lines.append(f"| {name} | {v['error']} | | | | | |")
            continue
        util = "" if v.get("gpu_util") is None else f"{v['gpu_util']:.0f}"
        lines.append(f"| {name} | {v['tok_s']:,.0f} | {v['peak_gb']:.2f} | "
                     f"{v['mfu_measured_peak']:.3f} | {v['mfu_datasheet']:.3f} | {util} | "
                     f"{v['losses'][-1]:.4f} |")
    ratios = data.get("ratios")
    if ratios:
        lines += ["", f"fastlab / nanoGPT-style: tokens/s **{ratios['tok_s']:.3f}x**, peak memory "
                      f"**{ratios['peak_memory']:.3f}x**; window losses differ by at most "
                      f"{100 * ratios['max_rel_loss_diff']:.2f}% (tolerance "
                      f"{100 * data['loss_tolerance']:.0f}%: "
                      f"{'tracking' if ratios['losses_track'] else 'NOT tracking'})."]
    profiles = {f"{n}{label}": v[key] for n, v in variants.items()
                for key, label in (("profile", ""), ("profile_graph", " (replays)"))
                if v.get(key) and "ms_per_step" in v[key]}
    if profiles:
        cats = sorted({c for p in profiles.values() for c in p["ms_per_step"]})
        lines += ["", "GPU kernel time per step (ms, torch.profiler, eager steps):", "",
                  "| category | " + " | ".join(profiles) + " |",
                  "|---|" + "---|" * len(profiles)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(f"{p['ms_per_step'].get(c, 0.0):.2f}"
                                                  for p in profiles.values()) + " |")
        lines.append("| total | " + " | ".join(f"{p['kernel_ms_total']:.2f}"
                                                for p in profiles.values()) + " |")
        lines.append("| GPU span (first start to last end) | " + " | ".join(
            f"{p['span_ms_per_step']:.2f}" if "span_ms_per_step" in p else "-"
            for p in profiles.values()) + " |")
        for name, p in profiles.items():
            lines += ["", f"Longest kernels, {name} (ms per step):", ""]
            # rows are (kernel, ms) or, from later runs, (kernel, ms, launches per step)
            lines += [f"- {row[1]:.2f} `{row[0]}`"
                      + (f" ({row[2]:g} launches)" if len(row) > 2 else "")
                      for row in p["top_kernels"][:15]]
    plt = _plt()
    windows = max((len(v["losses"]) for v in variants.values() if "losses" in v), default=1)
    every = shape["steps"] // windows  # steps per log window
    for kind, key, ylabel in (("loss", "losses", "mean loss of the log window"),
                              ("tok_s", "tok_s_windows", "tokens/s of the log window")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, v in variants.items():
            if key in v:
                ax.plot([every * (i + 1) for i in range(len(v[key]))], v[key], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"e2e_{kind}.png"), dpi=100)
        plt.close(fig)
        lines += ["", f"![{kind}](e2e_{kind}.png)"]
    return lines


def other_section(name: str, data: dict) -> list:
    lines = [f"## {name}", "", "```json"]
    shown = {k: v for k, v in data.items() if not isinstance(v, list) or len(v) <= 8}
    lines += json.dumps(shown, indent=1).splitlines()[:80]
    return lines + ["```"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="the results folder")
    args = parser.parse_args(argv)
    out_dir = args.dir
    lines = ["# fastlab bench report", ""]
    kernels = os.path.join(out_dir, "benches.json")
    if os.path.exists(kernels):
        machines, records = render.load([kernels])
        body = render.markdown(machines, records).splitlines()[2:]
        written = render.plots(records, out_dir)
        lines += ["## Kernels against their peers and floors", ""] + body
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in written]
    else:
        lines += ["## Kernels", "", "No benches.json in this folder: the kernel benches were "
                                   "not run (`make bench BENCH_PARTS=kernels`)."]
    lines.append("")
    e2e = os.path.join(out_dir, "e2e_gpt2.json")
    if os.path.exists(e2e):
        with open(e2e) as f:
            lines += e2e_section(json.load(f), out_dir)
    else:
        lines += ["## End to end", "", "No e2e_gpt2.json: `make bench BENCH_PARTS=e2e`."]
    for path in sorted(Path(out_dir).glob("*.json")):
        if path.name in ("benches.json", "e2e_gpt2.json", "pytest-benchmark.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "machine" in data:
            lines += [""] + other_section(path.stem, data)
    with open(os.path.join(out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out_dir, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
