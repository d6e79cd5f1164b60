from setuptools import setup

setup()  # the metadata is in pyproject.toml; this shim keeps `python setup.py` tools working
