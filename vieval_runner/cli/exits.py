"""The `vieval` exit statuses (README: "Exit status")."""

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_CHECKPOINTS_FAILED = 0, 1, 2, 3
EXIT_CHECK_FOUND = 3  # `vieval check`: orphans or steps to evaluate again
EXIT_STORE_FULL = 4
