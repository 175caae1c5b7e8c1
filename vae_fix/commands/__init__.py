"""One module per CLI command. Each defines NAME, HELP, add_arguments(parser) and run(args) -> int."""
