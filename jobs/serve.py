"""Ray job: the online operator bandit behind Ray Serve (`simmerge serve`).

    ray job submit --working-dir . -- python jobs/serve.py --config STATE_FOLDER   # from `simmerge bandit-init`
"""

from _entry import main

if __name__ == "__main__":
    main("serve")
