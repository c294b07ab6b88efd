"""The version of elves, which archives record as their writer (the package's version too)."""
__version__ = "0.1.0"
