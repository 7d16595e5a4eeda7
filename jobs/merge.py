"""Ray job: a streaming merge from a mergekit-style YAML (`simmerge merge`).

    ray job submit --working-dir . -- python jobs/merge.py --config merge.yaml --out s3://bucket/merged --cpus-per-actor 2
"""

from _entry import main

if __name__ == "__main__":
    main("merge")
