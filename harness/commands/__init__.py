"""One module per `python -m harness` sub-command; each exposes `register(subparsers)`."""
