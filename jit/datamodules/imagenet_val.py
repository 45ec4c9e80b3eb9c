"""Sort the flat official ImageNet `val/` (50,000 files) into class folders.

The official validation archive unpacks to `val/ILSVRC2012_val_00000001.JPEG ...` with no
class folders; the ImageFolder layout this framework reads needs `val/<wnid>/<image>`.
The labels come from `LOC_val_solution.csv` (Kaggle's ImageNet Object Localization
Challenge files: `ImageId,PredictionString`, the string starting with the image's wnid):

    python -m jit.datamodules.imagenet_val /data/imagenet/val LOC_val_solution.csv

Files are moved (same file system: no copy); running it again after a partial run
finishes the job. Every image of the folder must be listed, else nothing is moved.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path


def read_solution(solution_csv: str | os.PathLike) -> dict[str, str]:
    """image id (file name without .JPEG) -> wnid."""
    labels = {}
    with open(solution_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise ValueError(f"{solution_csv}: expected the columns ImageId,PredictionString "
                             f"(LOC_val_solution.csv), found {reader.fieldnames}")
        for row in reader:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    return labels


def arrange_val(val_dir: str | os.PathLike, solution_csv: str | os.PathLike) -> int:
    """Move each `val_dir/<id>.JPEG` into `val_dir/<wnid>/`; returns the number moved."""
    val_dir = Path(val_dir)
    labels = read_solution(solution_csv)
    flat = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg"))
    unlisted = [p.name for p in flat if p.stem not in labels]
    if unlisted:
        raise ValueError(f"{len(unlisted)} image(s) of {val_dir} are not in {solution_csv}, "
                         f"e.g. {', '.join(unlisted[:3])}; nothing was moved")
    for path in flat:
        target = val_dir / labels[path.stem]
        target.mkdir(exist_ok=True)
        path.rename(target / path.name)
    return len(flat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jit.datamodules.imagenet_val",
                                     description="Sort the flat ImageNet val/ folder into class folders.")
    parser.add_argument("val_dir", help="the folder holding ILSVRC2012_val_*.JPEG")
    parser.add_argument("solution_csv", help="LOC_val_solution.csv (ImageId,PredictionString)")
    args = parser.parse_args(argv)
    try:
        moved = arrange_val(args.val_dir, args.solution_csv)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"moved {moved} images of {args.val_dir} into class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
