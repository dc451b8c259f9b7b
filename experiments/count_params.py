"""Print the parameter count of every model of the zoo beside the paper's (Tables 2 and 3).

Models are built on the ``meta`` device, so the 133M-parameter FC models cost no memory.

    python experiments/count_params.py            # CIFAR-10 table (3 channels, 10 classes)
    python experiments/count_params.py --json runs/param_counts.json
"""

from __future__ import annotations

from ella.interrupt import quiet_interrupts

quiet_interrupts()  # first: Ctrl-C while torch loads ends with one line, not a traceback

import argparse
import json
from pathlib import Path

from ella.cli import positive_int, run_script
from ella.models import DEFAULT_ALPHA, LAYER_NAMES, build_model, count_parameters

# Exact counts from the per-block formulas (FC C X C' Y + C' Y, CONV 9 C C' + C', F-FC C C' (X + Y) + C' + Y, S-FC
# C C' (M_X + M_Y) + C', S-CONV C C' M + C', plus the head), which round to the paper's printed figures; S-CONV with
# 5 anchors per 3x3 filter (paper: half, rounded up).
CIFAR10_EXPECTED = {
    "fc": 133_635_690,
    "conv": 338_770,
    "fc_conv": 133_865_010,
    "ffc": 1_542_625,
    "ffc_conv": 1_771_945,
    "sfc": 831_820,
    "sconv": 237_050,
    "sfc_sconv": 959_420,
    "gconv": 338_770,
    "ffc_conv_gconv": 1_237_527,
}
# What the paper prints (Table 2 / Table 3), for the reader's comparison.
PAPER_PRINTED = {
    "fc": "133.6M",
    "conv": "0.3M (338,770 in App. F)",
    "fc_conv": "133.9M",
    "ffc": "1.5M",
    "ffc_conv": "1.8M",
    "sfc": "0.8M",
    "sconv": "0.2M",
    "sfc_sconv": "1.0M",
    "gconv": "0.3M (pointwise, App. Table 7)",
    "ffc_conv_gconv": "1.2M (alpha 2)",
}
# Quadrant-MNIST toy problem (1 channel, 32x32; 10-class digit / 40-class digit+quadrant task), same formulas.
TOY_EXPECTED = {
    ("fc", 10): 112_664_170,
    ("fc", 40): 112_683_400,
    ("conv", 10): 338_590,
    ("conv", 40): 357_820,
    ("ffc_conv", 10): 1_730_805,
    ("ffc_conv", 40): 1_750_035,
}


def count(layer: str, in_channels: int, n_classes: int, alpha: int | None = None) -> int:
    """Parameter count of a model built on the meta device."""
    return count_parameters(build_model(layer, in_channels, n_classes, alpha, device="meta"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-channels", type=positive_int, default=3,
                        help="input channels (3: CIFAR-10, 1: MNIST; default: 3)")
    parser.add_argument("--n-classes", type=positive_int, default=10,
                        help="number of classes of the head (default: 10)")
    parser.add_argument("--alpha", type=positive_int, default=None,
                        help="width (default: each model's own, 10; 2 for ffc_conv_gconv)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the counts to this JSON file (default: none, print only)")
    args = parser.parse_args()

    cifar_setting = args.in_channels == 3 and args.n_classes == 10 and args.alpha is None
    rows = []
    print(f"{'layer':<16}{'alpha':>6}{'parameters':>14}  {'spec':>12}  paper")
    for layer in LAYER_NAMES:
        n = count(layer, args.in_channels, args.n_classes, args.alpha)
        expected = CIFAR10_EXPECTED[layer] if cifar_setting else None
        mark = "" if expected is None else ("ok" if n == expected else f"MISMATCH ({expected:,})")
        alpha = args.alpha or DEFAULT_ALPHA[layer]
        print(f"{layer:<16}{alpha:>6}{n:>14,}  {mark:>12}  {PAPER_PRINTED[layer] if cifar_setting else ''}")
        rows.append({"layer": layer, "alpha": alpha, "parameters": n, "expected": expected})

    if cifar_setting:
        print("\nQuadrant-MNIST toy problem (1 channel, 32x32):")
        for (layer, classes), expected in TOY_EXPECTED.items():
            n = count(layer, 1, classes)
            print(f"{layer:<16}{classes:>4} classes{n:>14,}  {'ok' if n == expected else 'MISMATCH'}")
            rows.append({"layer": layer, "n_classes": classes, "in_channels": 1, "parameters": n, "expected": expected})

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_script(main)
