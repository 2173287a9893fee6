"""The one compiled part, the beat pump (hastore/_pump.c): optional. Without a C compiler and Python's headers the
install goes on without it, and the daemon wakes on every beat tick instead (hastore.io.pump)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hastore._pump", ["hastore/_pump.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter"])])
