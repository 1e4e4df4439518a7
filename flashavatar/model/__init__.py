"""FLAME, the Gaussian avatar, camera helpers and the procedural (licence-free) head and subject."""

from .avatar import (DEFAULT_LRS, GaussianAvatar, positional_encoding, rasterize_uv,  # noqa: F401
                     residual_covariance)
from .camera import (matrix_to_quat, matrix_to_rot6d, opencv_from_pytorch3d, project_points,  # noqa: F401
                     pytorch3d_from_opencv, quat_multiply, quat_to_matrix, rot6d_to_matrix, viewmat_from_Rt)
from .flame import FLAME, FLAME_DOWNLOAD_HINT, FlameCodes, boundary_loops, load_flame_pickle, read_obj  # noqa: F401
from .synthetic import SubjectPaths, make_subject, write_head_model  # noqa: F401
