"""The `dispatcher` command (cli/commands.py): the top layer, it may import every other one (docs/architecture.md,
"Layers"). `python -m cli`, `python -m dispatcher` and the `dispatcher` console script all run it."""
