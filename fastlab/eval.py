"""``python -m fastlab.eval RUN_DIR [--checkpoint best|last|PATH] [--samples N]
[--device D]``: a trained run's task metrics on its held-out set and its validation loss.

Prints one JSON object and writes it to ``RUN_DIR/eval-<checkpoint>.json``.
"""
import argparse
import json
import os
import sys
import time

from fastlab.tasks.base import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlab.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by python -m fastlab.train")
    p.add_argument("--checkpoint", default="best",
                   help="best (best.pt, else the newest good checkpoint), last, or a file")
    p.add_argument("--samples", type=int, default=None,
                   help="held-out samples (default: the run's eval.samples)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.samples is not None and args.samples < 1:
        parser().error(f"--samples must be >= 1, got {args.samples}")
    from fastlab.train.runs import open_run

    try:
        run = open_run(args.run_dir, args.checkpoint, args.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = args.samples or run.cfg.eval.samples
    t0 = time.perf_counter()
    metrics = run.task.evaluate(run.model, n, run.device)
    metrics.update(run.task.validation_loss(run.model, n, run.device))
    result = {"run": os.path.abspath(args.run_dir), "checkpoint": os.path.basename(run.path),
              "step": run.state.get("step"), "samples": n, "task": run.cfg.task.name,
              "metric": run.task.metric, **metrics,
              "eval_s": round(time.perf_counter() - t0, 3)}
    from fastlab.train.logger import strict_tree, write_json

    name = os.path.splitext(os.path.basename(run.path))[0]
    write_json(os.path.join(args.run_dir, f"eval-{name}.json"), result)
    print(json.dumps(strict_tree(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
