"""Ray job: probe inference, one cached pass per model (GPU actors when asked) (`simmerge probe`).

    ray job submit --working-dir . -- python jobs/probe.py --config probe.yaml --out DEST --gpus-per-inference-actor 1
"""

from _entry import main

if __name__ == "__main__":
    main("probe")
