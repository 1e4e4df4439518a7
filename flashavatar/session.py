"""What train, render, reenact, export and bench share: frames in memory, FLAME + avatar, one render call.

:class:`FrameSet` holds one split compactly (uint8 images and masks, float cameras and FLAME codes) and
hands out float batches on the compute device. :class:`AvatarSession` builds FLAME and the avatar from a
config and renders batches of frames through :func:`flashavatar.rasterizer_choice.pick_rasterizer` (the compiled
rasteriser when it is built for the device).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import Config, background_color
from .rasterizer_choice import pick_rasterizer

log = logging.getLogger("flashavatar")

CODE_KEYS = ("shape", "expr", "jaw", "eyes", "eyelids")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device to run on; "cuda" gets its index (cuda:N) so that it compares equal to tensors' devices."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Index tensor on ``device`` without a host sync (a blocking host->GPU copy waits for the whole stream)."""
    if idx.device == device:
        return idx
    if idx.device.type == "cpu" and device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


@dataclass
class FrameSet:
    """One split of a subject, in memory.

    gt [F, H, W, 3] uint8 (composited over the background), head_mask / mouth_mask [F, H, W] bool,
    viewmats [F, 4, 4] world->camera (OpenCV), Ks [F, 3, 3], codes {shape [1 or F, S], expr [F, E],
    jaw [F, 6], eyes [F, 12], eyelids [F, 2]}, frame_ids [F] (dataset frame numbers, for file names).
    """

    gt: torch.Tensor
    head_mask: torch.Tensor
    mouth_mask: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    codes: dict[str, torch.Tensor]
    frame_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.gt.shape[0])

    @property
    def height(self) -> int:
        return int(self.gt.shape[1])

    @property
    def width(self) -> int:
        return int(self.gt.shape[2])

    @functools.cached_property
    def pair_prev(self) -> torch.Tensor:
        """Indices t-1 of temporally adjacent pairs (consecutive frame ids), on the CPU."""
        ok = (self.frame_ids[1:] - self.frame_ids[:-1]) == 1
        return torch.nonzero(ok).flatten()

    @functools.cached_property
    def pair_next(self) -> torch.Tensor:
        return self.pair_prev + 1

    def to(self, device: torch.device) -> "FrameSet":
        return FrameSet(self.gt.to(device), self.head_mask.to(device), self.mouth_mask.to(device),
                        self.viewmats.to(device), self.Ks.to(device),
                        {k: v.to(device) for k, v in self.codes.items()}, self.frame_ids)

    def codes_at(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.codes.items():
            out[k] = v.expand(len(idx), -1) if (k == "shape" and v.shape[0] == 1) else v[_to_device(idx, v.device)]
        return out

    def batch(self, idx: torch.Tensor, device: torch.device, *, frame_ids: bool = True) -> dict[str, Any]:
        """Float batch: gt [B, H, W, 3] in [0, 1], masks [B, H, W] float, viewmats, Ks, codes on ``device``;
        ``frame_ids`` [B] (CPU) unless ``frame_ids=False`` (training: reading a device index on the host would
        synchronise)."""
        i = _to_device(idx, self.gt.device)
        out = {
            "gt": self.gt[i].to(device, non_blocking=True).float() / 255.0,
            "head_mask": self.head_mask[i].to(device, non_blocking=True).float(),
            "mouth_mask": self.mouth_mask[i].to(device, non_blocking=True).float(),
            "viewmats": self.viewmats[i].to(device),
            "Ks": self.Ks[i].to(device),
            "codes": {k: v.to(device) for k, v in self.codes_at(i).items()},
        }
        if frame_ids:
            out["frame_ids"] = self.frame_ids[idx.cpu()]
        return out

    def subset(self, idx: torch.Tensor) -> "FrameSet":
        return FrameSet(self.gt[idx], self.head_mask[idx], self.mouth_mask[idx], self.viewmats[idx], self.Ks[idx],
                        self.codes_at(idx), self.frame_ids[idx])


def _resize_frameset(fs: FrameSet, scale: float) -> FrameSet:
    """Resize images (area), masks (nearest) and intrinsics by ``scale``."""
    if scale == 1.0:
        return fs
    h, w = round(fs.height * scale), round(fs.width * scale)
    if h < 8 or w < 8:
        raise ValueError(f"data.image_scale={scale} makes {fs.height}x{fs.width} frames smaller than 8 px")
    gt = F.interpolate(fs.gt.permute(0, 3, 1, 2).float(), size=(h, w), mode="area")
    gt = gt.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def mask(m):
        return F.interpolate(m[:, None].float(), size=(h, w), mode="area")[:, 0] >= 0.5

    Ks = fs.Ks.clone()
    Ks[:, 0, :] *= w / fs.width  # fx, 0, cx (pixel edges scale exactly, so cx scales too)
    Ks[:, 1, :] *= h / fs.height
    return FrameSet(gt, mask(fs.head_mask), mask(fs.mouth_mask), fs.viewmats, Ks, fs.codes, fs.frame_ids)


class AvatarSession:
    """FLAME + Gaussian avatar + the frames of one subject, ready to render."""

    def __init__(self, cfg: Config, device: torch.device, flame, avatar, train_frames: FrameSet,
                 test_frames: FrameSet):
        self.cfg = cfg
        self.device = device
        self.flame = flame
        self.avatar = avatar
        self.train_frames = train_frames
        self.test_frames = test_frames
        self.background = torch.tensor(background_color(cfg.data.background), device=device)
        # NaN/inf input check of the compiled rasteriser: one device->host read per call; training turns it off
        # (a non-finite loss is caught when the loop reads the loss)
        self.check_finite = True

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, cfg: Config, device: torch.device, *, load_frames: bool = True) -> "AvatarSession":
        from . import data_adapter

        train, test, head_model, template = data_adapter.load_subject(cfg, load_frames=load_frames)
        train = _resize_frameset(train, cfg.data.image_scale)
        test = _resize_frameset(test, cfg.data.image_scale)
        flame, avatar = data_adapter.build_avatar(cfg, head_model, template, train, device)
        # keep frames on the GPU when they fit easily (uint8: 0.8 MB per 512x512 frame)
        if device.type == "cuda":
            bytes_needed = sum(t.gt.numel() * 1.7 for t in (train, test))
            free, _ = torch.cuda.mem_get_info(device)
            if bytes_needed < 0.25 * free:
                train, test = train.to(device), test.to(device)
        return cls(cfg, device, flame, avatar, train, test)

    # ------------------------------------------------------------------------------------- rendering
    @property
    def sh_degree(self) -> int:
        return int(self.avatar.max_sh_degree)

    @property
    def num_gaussians(self) -> int:
        return int(self.avatar.n_gaussians)

    @property
    def width(self) -> int:
        return self.train_frames.width if len(self.train_frames) else self.test_frames.width

    @property
    def height(self) -> int:
        return self.train_frames.height if len(self.train_frames) else self.test_frames.height

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.avatar.parameter_groups()

    def gaussians(self, codes: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Avatar output for a batch of FLAME codes (see GaussianAvatar.forward)."""
        return self.avatar(codes)

    def render_gaussians(self, g: dict[str, Any], viewmats: torch.Tensor, Ks: torch.Tensor, sh_degree: int,
                         width: int | None = None, height: int | None = None) -> dict[str, torch.Tensor]:
        """Rasterise B Gaussian sets, one camera each: viewmats [B, 4, 4], Ks [B, 3, 3] -> image [B, H, W, 3],
        alpha [B, H, W, 1], depth [B, H, W, 1]."""
        b = viewmats.shape[0]
        k = (sh_degree + 1) ** 2
        name, fn = pick_rasterizer(viewmats.device)
        extra = {} if self.check_finite or name != "ops" else {"check_finite": False}
        render, alpha, meta = fn(
            g["means"], g["quats"], g["scales"], g["opacities"], g["sh"][:, :, :k], viewmats[:, None], Ks[:, None],
            width or self.width, height or self.height, sh_degree=sh_degree,
            backgrounds=self.background.expand(b, 1, 3), **extra)
        return {"image": render[:, 0], "alpha": alpha[:, 0], "depth": meta["depth"][:, 0]}

    def render(self, batch: dict[str, Any], sh_degree: int | None = None, *, want_residual: bool = False,
               want_surface: bool = False) -> dict[str, Any]:
        """Animate and render a batch from :meth:`FrameSet.batch`."""
        d = self.sh_degree if sh_degree is None else sh_degree
        g = self.gaussians(batch["codes"])
        out = self.render_gaussians(g, batch["viewmats"], batch["Ks"], d)
        out["means"] = g["means"]
        if want_residual:
            out["residual"] = g["residual"]
        if want_surface:
            out["surface"] = g["means"] - g["residual"]["means"]  # the mesh-attached point of each Gaussian
        return out


def load_run(run_dir: str | Path, device: str | torch.device | None = None, *, load_frames: bool = True,
             overrides: dict[str, Any] | None = None) -> tuple[AvatarSession, dict[str, Any]]:
    """Session of a trained run folder (its ``config.yaml`` + ``checkpoints/last.pt``) and the checkpoint."""
    from . import config as config_mod
    from .io_utils import load_checkpoint

    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.yaml", run_dir / "checkpoints" / "last.pt"
    if not cfg_path.is_file() or not ckpt_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a trained run folder (needs config.yaml and checkpoints/last.pt;"
                                " make one with `flashavatar train --out DIR`)")
    cfg = config_mod.load(cfg_path)
    if overrides:
        config_mod._merge(cfg, overrides, "")
    dev = resolve_device(device or cfg.train.device)
    session = AvatarSession.build(cfg, dev, load_frames=load_frames)
    ckpt = load_checkpoint(ckpt_path, map_location=dev)
    from .train import load_model_state

    load_model_state(session.avatar, ckpt, ckpt_path)
    session.avatar.active_sh_degree = session.sh_degree
    session.avatar.eval()
    return session, ckpt
