"""Packaging for moesiftornado_durable."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


VERSION = re.search(r'^__version__ = "([^"]+)"', read("moesiftornado_durable/__init__.py"), re.M).group(1)

setup(
    name="moesiftornado-durable",
    version=VERSION,
    description="Durable, disk-spooled Moesif API analytics middleware for Tornado: no event lost once logged",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["moesiftornado_durable", "moesiftornado_durable.*"]),
    package_data={"moesiftornado_durable": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=[
        # Tornado 5.1 is supported on Python 3.9 only: it imports ABCs from `collections`, gone in 3.10.
        "tornado>=5.1,<7; python_version < '3.10'",
        "tornado>=6.0,<7; python_version >= '3.10'",
        "moesifapi>=1.5,<2",
        "persist-queue>=1.0,<2",
        "tenacity>=8.2",
        "certifi",  # the CA bundle for HTTPS to Moesif (the one requests used; transport.py reads it directly)
        # writes each captured event, with its JSON bodies, in under half the CPU time of the json module;
        # 3.9 added orjson.Fragment (a body written once, placed in the event as it is)
        "orjson>=3.9",
    ],
    extras_require={
        "encryption": ["cryptography>=41"],
        # orjson is a dependency now: the extra stays, so `pip install 'moesiftornado-durable[fast]'` still works
        "fast": ["orjson>=3.9"],
        # names the shipper process in ps/top by its SPOOL_DIR (without it: only the short name, on Linux)
        "proctitle": ["setproctitle>=1.3"],
        "test": ["pytest>=7.3", "pytest-xdist>=3", "hypothesis>=6", "ruff>=0.4", "mypy>=1.8", "types-requests",
                 "cryptography>=41",
                 "setproctitle>=1.3"],
    },
    entry_points={"console_scripts": ["moesiftornado-durable=moesiftornado_durable.cli:main"]},
    classifiers=[
        "Framework :: Tornado",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Typing :: Typed",
    ],
)
