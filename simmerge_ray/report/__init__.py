"""How results are shown: charts (charts.py) and the one-line verdicts of the commands that
evaluate (verdict.py). The pipeline's own report is simmerge_ray/pipeline/report.py."""
