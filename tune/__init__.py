"""tune: Ray Tune sweeps over step budgets and parameterizations (spec.py: the YAML format; sweep.py:
running and resuming; results.py: the best config per budget, the CSV and the plot; the table printed
at the end is commands/formatting.py)."""
