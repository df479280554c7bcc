"""The `ponder` command line: one entry point, subcommands owned by their packages."""
__version__ = "0.1.0"
