"""The command line and service wiring: every subcommand, the service start-up, model loading."""
