"""moescope: size, routing and redundancy of Mixture-of-Experts language models.

The library is the product; the ``moescope`` command is a thin layer over it.
Modules never print: they return dataclasses or DataFrames.
"""

__version__ = "0.1.0"
