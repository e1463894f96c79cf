"""The `llama-omni` command line: one typed function per subcommand (see main.py)."""
