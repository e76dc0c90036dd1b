"""lavis_plugins: BLIP-2 pre-training, fine-tuning and zero-shot video transfer for LAVIS.

The environment with exact versions is made by `make setup` (env/requirements.lock); the
requirements below are the loose ones a user installing into their own environment needs.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def yaml_files(folder: str):
    return [str(p.relative_to(ROOT / folder)) for p in (ROOT / folder).rglob("*.yaml")]


setup(
    name="lavis_plugins",
    version="0.1.0",
    description="BLIP-2 pre-training, fine-tuning and zero-shot video QA as LAVIS plugins",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    # 3.10 installs from env/requirements-py310.lock, 3.11-3.12 from env/requirements.lock;
    # 3.13 has no wheel of torchvision 0.20.1 (the torch 2.5.1 pair)
    python_requires=">=3.10,<3.13",
    # the console script's launcher: outside the package so --help need not import LAVIS
    py_modules=["lavis_plugins_cli"],
    packages=find_packages(include=["lavis_plugins", "lavis_plugins.*"])
    + ["lavis_plugins.configs", "lavis_plugins.projects"],
    # the YAMLs live at the repository root and ship inside the package, so a non-editable
    # install finds them (lavis_plugins.paths.resource_dir)
    package_dir={"lavis_plugins.configs": "configs", "lavis_plugins.projects": "projects"},
    package_data={
        "lavis_plugins.configs": yaml_files("configs"),
        "lavis_plugins.projects": yaml_files("projects"),
        "lavis_plugins": ["assets/*"],
    },
    install_requires=[
        "salesforce-lavis==1.0.2",
        "torch>=2.1",
        "torchvision",
        "transformers>=4.40,<5",
        "numpy<2",
        "omegaconf",
        "timm",
        "decord",
        "av",
        "pycocoevalcap",
        "matplotlib",
        "tqdm",
        "webdataset",
    ],
    entry_points={"console_scripts": ["lavis-plugins=lavis_plugins_cli:main"]},
)
