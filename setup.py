from setuptools import find_packages, setup

setup(
    name="hlb-gpt",
    version="0.1.0",
    description="A small, fast GPT trainer for WikiText ablations, with Grokfast gradient filters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hlb_gpt", "hlb_gpt.*"]),
    package_data={"hlb_gpt": ["assets/*", "assets/*/*"]},
    install_requires=[
        # The oldest torch with everything the code uses (torch.optim.Muon: 2.9). No cap: on a machine without a
        # GPU, install the CPU build first (README), or any torch requirement pulls the multi-GB CUDA build.
        "torch>=2.9",
        "datasets>=2.14",
        "tiktoken>=0.5",
        "click>=8.1",
        "tqdm>=4.60",
        "wandb>=0.15",
        "numpy>=1.24",
        "scipy>=1.11",  # stats.false_discovery_control
        "matplotlib>=3.7",
        "safetensors>=0.4,<1",  # `hlb-gpt export`: weights any tool can read, loaded without running code
        "filelock>=3.0",  # workers starting together update a sweep's manifest in turn (torch needs it too)
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.0"]},  # the suite runs on every core (pytest.ini)
    entry_points={"console_scripts": ["hlb-gpt = hlb_gpt.cli:main"]},
)
