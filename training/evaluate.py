"""Held-out evaluation of a fine-tuned checkpoint beside a gradient-boosting baseline on the same rows.

    python training/evaluate.py --checkpoint out/finetuned --data_dir MEDS_DIR \
        --labels MEDS_DIR/labels/in_hospital_mortality.parquet --output_dir out/evaluation

Writes metrics.json (AUROC/AUPRC with bootstrap 95% intervals, Brier, ECE, by age band and sex), roc.png and
calibration.png.
"""

import sys

from ehr_transformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
