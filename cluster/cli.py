"""The `fr_train` command's entry point: parse the command line into one TrainConfig, then launch it
as a Ray Train job (cluster/launch.py).

Why here and not in fr_train: launching needs the cluster package, and fr_train must not import it
(dependencies go cluster → fr_train → data_pipeline). What the command line means (its flags, the
config keys they set, `fr_train list`) stays in fr_train/command_line.py; this module only runs it.
`python -m cluster.cli` is the same command as the `fr_train` console script.
"""

from __future__ import annotations

import sys

from cluster.launch import PlacementError, launch
from fr_train.command_line import build_parser, config_from_args, print_list
from fr_train.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit code is 0 when done, 2 for a config error (one line naming the key),
    1 for a request the cluster or the data refuses (one line, no traceback), else launch's own."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        print_list()
        return 0
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"fr_train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        return launch(cfg)
    except (PlacementError, ValueError, FileNotFoundError) as exc:  # the request or the data: one line, no trace
        print(f"fr_train: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
