"""Ray job: the whole pipeline, zoo to plan (`simmerge pipeline`).

    ray job submit --working-dir . -- python jobs/pipeline.py --config pipeline.yaml --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("pipeline")
