"""The benchmarks: scripts that measure the library and write docs/results/ and docs/plots/. Run one
from the repository root as a module, `python -m benchmarks.<name> --help`; they import each other
as `benchmarks.<name>`. Not part of the installed package (the wheel ships fldd, pipelines, tune,
serving and commands only)."""
