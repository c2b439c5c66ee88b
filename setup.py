from pathlib import Path

from setuptools import setup

setup(
    name="isreshape-triton",
    version="0.1.0",
    description="Fused Triton kernels for IS-Reshape off-policy policy-gradient losses",
    long_description=(Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # SPDX (PEP 639); setuptools warns on a License :: classifier beside it
    keywords=["triton", "pytorch", "reinforcement learning", "rlhf", "llm", "policy gradient",
              "importance sampling", "ppo", "grpo", "verl", "trl", "openrlhf"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Science/Research",
    ],
    python_requires=">=3.10",
    # `kernels/` (the @triton.jit code) installs as isreshape_triton.kernels, so a
    # top-level `import kernels` (a different PyPI package) is never needed.
    packages=["isreshape_triton", "isreshape_triton.families", "isreshape_triton.reference",
              "isreshape_triton.kernels", "isreshape_triton.kernels.families", "isreshape_triton.integrations",
              "isreshape_triton.dev"],
    package_dir={"isreshape_triton.kernels": "kernels"},
    # the window CI tests (oldest and newest Triton); isreshape_triton/versions.py checks it at import
    install_requires=["torch>=2.9", "triton>=3.5,<4", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy", "arviz", "matplotlib"],
        "bench": ["matplotlib"],
    },
    # `import verl` loads its plugins: this registers our families as verl policy losses
    entry_points={"verl.plugins": ["isreshape_triton = isreshape_triton.integrations.verl"]},
)
