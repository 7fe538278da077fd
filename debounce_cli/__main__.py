"""``python -m debounce_cli``: the same entry point as the ``debounce`` script."""

from debounce_cli.fast import main

if __name__ == "__main__":
    main()
