# The C runtime is compiled into the cffi extension bitnet_run._bitnet (see bitnet_run/_build.py).
from setuptools import setup

setup(cffi_modules=["bitnet_run/_build.py:ffibuilder"])
