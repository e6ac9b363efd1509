"""The ``signgate`` command line: thin wiring over the library."""
