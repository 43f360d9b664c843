"""tune: Ray Tune sweeps over step budgets and parameterizations (spec.py: the YAML format; sweep.py:
running and resuming; results.py: the table, CSV and plot)."""
