from setuptools import setup

setup(cffi_modules=["tools/build_core.py:ffibuilder"])
