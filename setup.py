"""Install rcka-kernels. The pure-Python package always installs; the optional
CUDA library in csrc/ is built by CMake when nvcc is found (see CMakeLists.txt)."""

from setuptools import setup

setup()
