"""The demo report: charts and the markdown/JSON summary of a pipeline run."""
