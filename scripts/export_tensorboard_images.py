"""Save images logged to TensorBoard as PNG files (e.g. the monitoring grids shown in the README).

    python scripts/export_tensorboard_images.py runs/tiny_demo/version_0 --out docs/ [--tag samples/base_vs_finetuned] [--step 40]

Without ``--tag`` every image tag is exported; without ``--step`` the last logged image of each tag. Files are
named ``<tag with / replaced by __>_step<N>.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run folder holding events.out.tfevents.* files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--tag", action="append", help="image tag to export (repeatable; default: all)")
    parser.add_argument("--step", type=int, help="the step to export (default: the last of each tag)")
    args = parser.parse_args(argv)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(args.logdir.glob("events.out.tfevents.*"))
    if not files:
        parser.error(f"{args.logdir}: no events.out.tfevents.* file")
    images: dict[str, list] = {}
    for events in files:
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(acc.Images(tag))
    tags = args.tag or sorted(images)
    missing = [t for t in tags if t not in images]
    if missing:
        parser.error(f"no image tag {missing} in {args.logdir}; it has {sorted(images)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        chosen = [e for e in images[tag] if args.step is None or e.step == args.step]
        if not chosen:
            print(f"{tag}: nothing logged at step {args.step}", file=sys.stderr)
            continue
        event = chosen[-1]
        path = args.out / f"{tag.replace('/', '__')}_step{event.step}.png"
        path.write_bytes(event.encoded_image_string)
        print(f"{tag} step {event.step} ({event.width}x{event.height}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
