"""The paper's studies as code, and the CLI subcommands that run them."""
