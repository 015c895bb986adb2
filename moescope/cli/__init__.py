"""The ``moescope`` command line: a thin layer over the library."""
