"""commands: the top layer, the one that wires jobs together: the `fldd` command line (cli.py, with
its commands in model_commands, data_commands and release_commands), the end-to-end demo (demo.py)
and what they print (formatting.py). The only code that imports both `tune` and `serving`; nothing
below imports it (tests/test_layers.py: commands > tune | serving > pipelines > fldd)."""
