"""`python -m dispatcher`: runs the `dispatcher` command, which lives in cli/ (the top layer). The shared core never
imports the CLI; this entry point only forwards to it, importing it when run (tests/test_layers.py allows exactly
this one import, inside `main`)."""


def main() -> None:
    from cli.commands import main as run

    run()


if __name__ == "__main__":
    main()
