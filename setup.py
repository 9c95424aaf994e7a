"""container-healthcheck: the Docker container health API for BlueKing APPO hosts."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "healthcheck", "__init__.py")) as handle:
        return re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M).group(1)


setup(
    name="container-healthcheck",
    version=read_version(),
    description="Tells a load balancer whether an app's Docker container on this host is healthy",
    packages=find_packages(include=["healthcheck", "healthcheck.*"]),
    package_data={"healthcheck": ["openapi.json"]},
    python_requires=">=3.6",
    install_requires=[
        "bottle>=0.12,<0.14",
        "cheroot>=8,<11",
        "prometheus-client>=0.12,<0.18",
    ],
    entry_points={"console_scripts": ["container-healthcheck = healthcheck.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
