"""Ray job: merge pairs with every operator and evaluate them: the selector's labels (`simmerge label`).

    ray job submit --working-dir . -- python jobs/label.py --config label.yaml --out DEST
"""

from _entry import main

if __name__ == "__main__":
    main("label")
