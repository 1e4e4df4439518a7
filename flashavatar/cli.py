"""The ``flashavatar`` command.

Each subcommand lives in its own module, imported only when that subcommand runs (so ``flashavatar --help``
is instant and never touches CUDA). A command module provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # declare options (with help texts)
    def run(args: argparse.Namespace) -> int                      # do the work, return an exit code
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Order = order in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flashavatar.demo", "set up and run the main job on the bundled synthetic subject"),
    "synth": ("flashavatar.synth_cmd", "make a synthetic subject (head model, frames, masks, tracker files)"),
    "prepare": ("flashavatar.prepare", "turn a raw video (+ parsing labels, matting) into a dataset folder"),
    "validate": ("flashavatar.validate", "check a dataset and tracker folder; non-zero exit if training would fail"),
    "inspect": ("flashavatar.inspect_cmd", "write posed meshes, Gaussian centres and overlays for chosen frames"),
    "train": ("flashavatar.train", "train a Gaussian head avatar"),
    "render": ("flashavatar.render", "render the test split, metrics, video, robustness run"),
    "reenact": ("flashavatar.reenact", "drive one avatar with another sequence's expression codes"),
    "export": ("flashavatar.export", "export a frame's Gaussians as a 3DGS-standard PLY"),
    "bench": ("flashavatar.bench", "frames per second of animate + render (FLAME, MLP, rasteriser)"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise SystemExit(f"flashavatar {name}: this command is not available in this build ({module} missing)")
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="flashavatar",
        description="Gaussian head avatars from FLAME-tracked monocular video. Run `flashavatar COMMAND --help`.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the usage error and exits 2
    name = argv[0]
    module = _load(name)
    sub = argparse.ArgumentParser(prog=f"flashavatar {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
