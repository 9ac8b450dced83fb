"""sd_jax: Stable Diffusion trained end to end in JAX/Flax (VAE, CLIP, latent-diffusion U-Net).

Install with the tested versions:  pip install -c constraints.txt -e .        (add [test] for the test suite)
"""

from setuptools import find_packages, setup

setup(
    name="sd_jax",
    version="0.1.0",
    description="Stable Diffusion trained end to end in JAX/Flax: VAE, CLIP, latent-diffusion U-Net.",
    python_requires=">=3.11",
    packages=find_packages(include=["sd_jax", "sd_jax.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "grain>=0.2.15",
        "ml-collections>=1.1",
        "absl-py",
        "etils[epath]",
        "numpy",
        "pillow",
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "tensorboardX>=2.6",
        "matplotlib>=3.9",
        # the rating gallery and preference store (python -m sd_jax.feedback): its web server, and parquet files
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pyarrow>=15",
    ],
    extras_require={
        # torch, diffusers, transformers and peft (diffusers' LoRA backend) are reference implementations for the
        # parity tests, never used by sd_jax itself; ruff is the linter CI runs before the tests (ruff.toml); httpx
        # (fastapi's TestClient) and selenium (drives Debian's chromium) test the rating gallery.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch>=2.4", "diffusers>=0.35", "transformers>=4.50", "peft>=0.17",
                 "ruff>=0.15", "httpx>=0.27", "selenium>=4.20"],
    },
)
