"""Ray job: plan a multi-way merge with the selector (`simmerge plan`).

    ray job submit --working-dir . -- python jobs/plan.py --selector SEL --catalog catalog.yaml --features FEATURES \
        --task code --models a b c --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("plan")
