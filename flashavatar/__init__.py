"""flashavatar: Gaussian head avatars from monocular video, with fast CUDA kernels.

Importing this package never compiles anything. The compiled ops live in ``flashavatar._C`` (built by
``pip install --no-build-isolation -e .``); ``flashavatar.ops`` explains what is missing if it is absent.
"""

__version__ = "0.1.0"
