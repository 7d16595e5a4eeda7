"""Ray job: a fitted selector applied unchanged to a larger model's zoo (`simmerge transfer`).

    ray job submit --working-dir . -- python jobs/transfer.py --config configs/zoo_large.yaml \\
        --out runs/transfer --selector runs/demo/selector
"""

from _entry import main

if __name__ == "__main__":
    main("transfer")
