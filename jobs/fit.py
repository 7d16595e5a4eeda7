"""Ray job: train the operator selector on the labels (`simmerge fit`).

    ray job submit --working-dir . -- python jobs/fit.py --features FEATURES --labels labels.parquet --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("fit")
