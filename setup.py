from setuptools import find_packages, setup

setup(
    name="guided-diffusion-pag",
    version="0.1.0",
    description="ADM (guided-diffusion) with Perturbed-Attention Guidance",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "scipy", "blobfile", "mpi4py", "tqdm", "Pillow"],
    extras_require={
        # mpich is the MPI that pip can install, so `mpiexec` works without a system MPI.
        "mpi": ["mpich"],
        # scikit-learn: the test that rebuilds datasets/digits16.npz from its bundled digits; scikit-image: the
        # test that holds our PSNR/SSIM to its reference implementation.
        # matplotlib: reproduce.py's curves (results/*.png); without it the table is still written.
        "plots": ["matplotlib"],
        "test": ["pytest", "scikit-learn", "scikit-image", "matplotlib"],
    },
)
