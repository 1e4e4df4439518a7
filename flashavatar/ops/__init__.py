"""Differentiable operators: Gaussian rasterisation, Earth Mover's distance, Gaussian 2-Wasserstein, SSIM (and
the inference-only MLP ops).

Thin autograd wrappers over the dispatcher ops registered by ``flashavatar._C``; ``reference`` holds the
pure-PyTorch versions that tests (and readers) trust.
"""

from ._ext import available, cuda_compiled  # noqa: F401
from .rasterize import rasterize_gaussians  # noqa: F401,E402
from .emd import EMDResult, emd, gaussian_w2, gaussian_w2_from_scales_quats  # noqa: F401
from .assembly import gaussian_assembly  # noqa: F401,E402
from .flame_lbs import flame_lbs  # noqa: F401,E402
from .ssim import fused_ssim_map  # noqa: F401,E402
from .mlp import fused_mlp, fused_mlp_supported, mlp_head, mlp_input  # noqa: F401,E402
