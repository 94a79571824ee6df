"""Build the Cython extensions from native/. Metadata lives in pyproject.toml.

Each extension has a pure-Python twin in broker/, so a missing compiler never silently changes
behaviour: the loaded backend is reported (broker.tokens.BACKEND) and can be made mandatory.
"""

from __future__ import annotations

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = [
    Extension("broker.tokens._native", ["native/tokens.pyx"]),
    Extension("broker._pump_native", ["native/pump.pyx"]),
]

setup(
    ext_modules=cythonize(
        [e for e in EXTENSIONS if all(os.path.exists(s) for s in e.sources)],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
