"""``python -m fastlab.sample RUN_DIR [--prompt TEXT ...] [-n N] [--max-new K]
[--temperature T] [--top-k K] [--seed S] [--checkpoint best|last|PATH] [--device D]``

Completions from a trained generative run (a GPT). With ``--prompt`` each text is encoded
by the task (e.g. ``12+34=`` for addition, digits as written) and continued; without,
``n`` held-out prompts are shown beside the expected completion.
"""
import argparse
import sys

import torch

from fastlab.tasks.base import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlab.sample",
                                description="Completions from a trained generative run.")
    p.add_argument("run_dir", help="a run directory written by python -m fastlab.train")
    p.add_argument("--prompt", action="append", default=[], help="a prompt as text (repeatable)")
    p.add_argument("-n", type=int, default=5, help="held-out prompts when no --prompt is given")
    p.add_argument("--max-new", type=int, default=None,
                   help="tokens to generate (default: the task's answer length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n must be >= 1, got {args.n}")
    if args.max_new is not None and args.max_new < 1:
        p.error(f"--max-new must be >= 1, got {args.max_new}")
    if not args.temperature >= 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    from fastlab.models import GPT, generate
    from fastlab.train.runs import open_run

    try:
        run = open_run(args.run_dir, args.checkpoint, args.device)
        if not isinstance(run.model, GPT):
            raise ConfigError(f"{args.run_dir}: sampling needs a generative model (model.arch="
                              f"gpt), this run has {type(run.model).__name__}; use "
                              "python -m fastlab.eval")
        if args.prompt:
            prompts = [run.task.encode_text(text).to(run.device) for text in args.prompt]
            expected = [None] * len(prompts)
        else:
            batch, expected = run.task.example_prompts(args.n, run.device)
            prompts = list(batch)
        max_new = args.max_new or getattr(run.task, "answer_len", None)
        if max_new is None:
            raise ConfigError("--max-new is needed: the task has no fixed answer length")
        generator = torch.Generator(run.device).manual_seed(args.seed)
        out = generate(run.model, prompts, max_new, temperature=args.temperature,
                       top_k=args.top_k, generator=generator)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, completion, truth in zip(prompts, out, expected):
        text = run.task.decode_text(completion.cpu())
        line = f"{run.task.decode_text(prompt.cpu())} -> {text}"
        if truth is not None:
            line += f"   (expected {truth}{'' if text == truth else ', wrong'})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
