"""Build the Cython hot path from ext/ into the airlock package.

Every compiled module has a pure-Python twin next to its dispatcher; the build
must still succeed when Cython compilation fails only if AIRLOCK_ALLOW_NO_EXT=1
(tests/test_accelerated.py fails loudly if the compiled module did not load).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = [
    Extension("airlock.chunk._chunker", ["ext/_chunker.pyx"], extra_compile_args=["-O3"]),
    Extension("airlock.log._record", ["ext/_record.pyx"], extra_compile_args=["-O3"]),
]

setup(
    ext_modules=cythonize(
        EXTENSIONS,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
