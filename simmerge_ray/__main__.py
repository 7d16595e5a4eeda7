"""`python -m simmerge_ray ...` is the `simmerge` command, for environments without its console
script (a Ray job's working directory, a container that only put the package on PYTHONPATH)."""

import sys

from simmerge_ray.cli import main

sys.exit(main())
