"""mIoU of the constant prediction (every pixel = the most frequent training class) on a segmentation
folder (``DIR/masks/{train,val[,test]}``): the floor a trained segmenter must clear. Usage:

    python scripts/constant_baseline.py DIR [NUM_CLASSES]

(``NUM_CLASSES`` is accepted for old command lines; classes absent from truth and prediction never count.)
Prints the validation metrics at the top level and each other split under its name; see
:func:`beit.tasks.segment_eval.constant_baseline`.
"""

from __future__ import annotations

import json
import sys

from beit.tasks.segment_eval import constant_baseline


def main() -> None:
    res = constant_baseline(sys.argv[1])
    out = {"majority_class": res.pop("class")}
    out.update({k: round(v, 2) for k, v in res.pop("val", {}).items()})
    out.update({split: {k: round(v, 2) for k, v in m.items()} for split, m in res.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
