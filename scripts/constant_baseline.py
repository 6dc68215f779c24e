"""mIoU of the constant prediction (every pixel = the most frequent training class) on a segmentation
folder (``DIR/masks/{train,val}``): the floor a trained segmenter must clear. Usage:

    python scripts/constant_baseline.py DIR NUM_CLASSES
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit.tasks.segment import IGNORE_INDEX, confusion_matrix, segmentation_metrics


def masks(folder: Path) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(Image.open(p))).long() for p in sorted(folder.glob("*.png"))]


def main() -> None:
    root, num_classes = Path(sys.argv[1]), int(sys.argv[2])
    train = torch.cat([m.flatten() for m in masks(root / "masks" / "train")])
    train = train[train != IGNORE_INDEX]
    majority = int(torch.bincount(train, minlength=num_classes).argmax())
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for m in masks(root / "masks" / "val"):
        conf += confusion_matrix(torch.full_like(m, majority), m, num_classes)
    res = segmentation_metrics(conf)
    print(json.dumps({"majority_class": majority, **{k: round(v, 2) for k, v in res.items() if not k.startswith("iou_")}}))


if __name__ == "__main__":
    main()
