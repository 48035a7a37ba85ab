"""The command line's commands by stage (``cli.py`` puts them together under one group)."""
