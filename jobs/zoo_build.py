"""Ray job: train the testbed's base model and domain experts (`simmerge zoo`).

    ray job submit --working-dir . -- python jobs/zoo_build.py --config zoo.yaml --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("zoo_build")
