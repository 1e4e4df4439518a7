"""FLAME, the Gaussian avatar, camera helpers and the procedural (licence-free) head and subject."""

from .avatar import DEFAULT_LRS, GaussianAvatar, positional_encoding, rasterize_uv, residual_covariance  # noqa: F401
from .flame import FLAME, FlameCodes, boundary_loops, load_flame_pickle, read_obj  # noqa: F401
