"""debounce: run a command once after the calls to it have gone quiet."""

__version__ = "0.1.0"
