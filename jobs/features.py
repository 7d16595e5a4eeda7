"""Ray job: structural (weights) and functional (probe) features of every model pair (`simmerge features`).

    ray job submit --working-dir . -- python jobs/features.py --config features.yaml --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("features")
