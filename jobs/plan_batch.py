"""Ray job: plan merges for a table of requests on an autoscaled actor pool (`simmerge plan-batch`).

    ray job submit --working-dir . -- python jobs/plan_batch.py --config requests.parquet --out DEST \
        --selector /data/selector --catalog /data/catalog.yaml --features /data/features --max-actors 16
"""

from _entry import main

if __name__ == "__main__":
    main("plan_batch")
