"""``flashavatar synth``: write the procedural head model and a synthetic subject (no licensed files needed)."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output root: <out>/<id>/{imgs,alpha,parsing}, <out>/tracker/<id>/checkpoint, "
                                    "<out>/flame/generic_model.pkl + head_template.obj")
    parser.add_argument("--subject-id", default="synthetic", help="subject folder name (default: synthetic)")
    parser.add_argument("--frames", type=int, default=240, help="number of frames (default: 240)")
    parser.add_argument("--size", type=int, default=256, help="square image size in pixels (default: 256)")
    parser.add_argument("--height", type=int, default=None, help="image height (overrides --size; non-square ok)")
    parser.add_argument("--width", type=int, default=None, help="image width (overrides --size)")
    parser.add_argument("--supersample", type=int, default=2, help="anti-aliasing factor per axis (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="head model / performance seed (default: 0)")
    parser.add_argument("--model-only", action="store_true", help="only write the FLAME-format head model to <out>")


def run(args: argparse.Namespace) -> int:
    from .model.synthetic import make_subject, write_head_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_only:
        path = write_head_model(args.out, seed=args.seed)
        print(f"head model: {path}")
        return 0
    size = (args.height or args.size, args.width or args.size)
    s = make_subject(args.out, args.subject_id, n_frames=args.frames, size=size, seed=args.seed,
                     supersample=args.supersample, progress=True)
    print(f"data_root:    {s.data_root}\ntracker_root: {s.tracker_root}\nsubject_id:   {s.subject_id}\n"
          f"model:        {s.model_path}\ntemplate:     {s.template_obj}\nframes:       {s.n_frames} "
          f"({s.height}x{s.width})")
    return 0
