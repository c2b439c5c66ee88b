from setuptools import setup

setup(
    name="isreshape-triton",
    version="0.1.0",
    description="Fused Triton kernels for IS-Reshape off-policy policy-gradient losses",
    python_requires=">=3.10",
    # `kernels/` (the @triton.jit code) installs as isreshape_triton.kernels, so a
    # top-level `import kernels` (a different PyPI package) is never needed.
    packages=["isreshape_triton", "isreshape_triton.reference", "isreshape_triton.kernels",
              "isreshape_triton.integrations"],
    package_dir={"isreshape_triton.kernels": "kernels"},
    install_requires=["torch", "triton", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy", "arviz", "matplotlib"],
        "bench": ["matplotlib"],
    },
    # `import verl` loads its plugins: this registers our families as verl policy losses
    entry_points={"verl.plugins": ["isreshape_triton = isreshape_triton.integrations.verl"]},
)
