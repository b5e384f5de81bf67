"""``python -m fastlab.train [CONFIG] [section.key=value ...]``: train and write a run dir."""
import sys

from fastlab.tasks.base import ConfigError
from fastlab.train.config import build_config, help_text
from fastlab.train.loop import train


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    file = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if file else argv
    try:
        if any(a in ("-h", "--help") for a in argv):
            print(help_text(argv))
            return 0
        cfg = build_config(file, overrides)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg)
    except ConfigError as exc:  # found while setting up: as the parser's errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = summary["final"]
    if final:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
