"""The demo pipeline as library functions: one module per group of stages (zoo.py, features.py,
selector.py, multiway.py, bandit.py), each stage a function with typed settings that the
`simmerge` command of that stage calls too; runner.py chains them with skip markers,
layout.py names the run folder's parts, and report.py writes the run's report."""

from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.pipeline.runner import PipelineSettings, Stage, run, stages

__all__ = ["PipelineSettings", "RunLayout", "Stage", "run", "stages"]
