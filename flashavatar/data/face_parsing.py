"""BiSeNet face parsing (ResNet-18 context path), the architecture of the widely used CelebAMask-HQ face
parser, so a checkpoint the user already has (e.g. ``79999_iter.pth``) loads with matching parameter names.

No weights ship with flashavatar and nothing is downloaded: :func:`load_face_parser` takes a path. The
network outputs 19 logits per pixel in the CelebAMask-HQ class order of :mod:`flashavatar.data.masks`.

Layout (parameter-name prefixes): ``cp.resnet`` (ResNet-18 trunk: stride-8/16/32 features with 128/256/512
channels), ``cp.arm16``/``cp.arm32`` (attention refinement), ``cp.conv_avg`` (global context),
``cp.conv_head16/32``, ``ffm`` (fuses the stride-8 trunk feature with the context path; the original's
separate spatial path is replaced by the trunk feature), ``conv_out`` (+ auxiliary ``conv_out16/32`` heads
used only in training).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics, which the face parser was trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs + identity (or 1×1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if in_ch != out_ch or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18Trunk(nn.Module):
    """ResNet-18 without its classifier; returns the stride-8, -16 and -32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))  # [B, 128, H/8, W/8]
        feat16 = self.layer3(feat8)  # [B, 256, H/16, W/16]
        feat32 = self.layer4(feat16)  # [B, 512, H/32, W/32]
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """Conv, then reweight channels by a sigmoid of their global average."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        weights = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * weights


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Trunk()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # [B, 128, 1, 1], broadcast below
        up32 = F.interpolate(self.arm32(feat32) + context, size=feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)  # [B, 128, H/16, W/16]
        up16 = F.interpolate(self.arm16(feat16) + up32, size=feat8.shape[2:], mode="nearest")
        up16 = self.conv_head16(up16)  # [B, 128, H/8, W/8]
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, kernel=1, padding=0)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        weights = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * weights


class OutputHead(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser: ``x [B, 3, H, W]`` (ImageNet-normalised RGB; H, W multiples of 32) -> logits.

    ``forward`` returns ``[B, n_classes, H, W]`` (main head, bilinearly upsampled); with ``aux=True`` also
    the two auxiliary heads, each ``[B, n_classes, H, W]``.
    """

    def __init__(self, n_classes: int = 19):
        super().__init__()
        self.n_classes = n_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, n_classes)
        self.conv_out16 = OutputHead(128, 64, n_classes)
        self.conv_out32 = OutputHead(128, 64, n_classes)

    def forward(self, x: torch.Tensor, *, aux: bool = False):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BiSeNet: x must be [B, 3, H, W], got {tuple(x.shape)}")
        size = x.shape[2:]
        feat8, context8, context16 = self.cp(x)
        logits = F.interpolate(self.conv_out(self.ffm(feat8, context8)), size=size, mode="bilinear",
                               align_corners=True)
        if not aux:
            return logits
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        return logits, up(self.conv_out16(context8)), up(self.conv_out32(context16))


def load_face_parser(weights: str | os.PathLike, *, n_classes: int = 19,
                     device: str | torch.device = "cpu") -> BiSeNet:
    """A :class:`BiSeNet` with the user's checkpoint (a state dict, optionally under ``"state_dict"`` and
    with ``"module."`` prefixes from DataParallel). Loaded with ``weights_only=True``; a checkpoint that does
    not match this architecture is an error listing the mismatched names."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--parsing-weights {path}: no such file (flashavatar never downloads weights; "
                                "pass the path of a BiSeNet/ResNet-18 CelebAMask-HQ face-parsing checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--parsing-weights {path}: cannot load it as a state dict ({type(exc).__name__}: "
                         f"{exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--parsing-weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = BiSeNet(n_classes)
    # the original code base also defines an unused spatial path (``sp.*``); ignore it if present
    state = {k: v for k, v in state.items() if not k.startswith("sp.")}
    expected = net.state_dict()
    for key, value in expected.items():  # checkpoints from before PyTorch 0.4.1 lack this BN counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def head(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise ValueError(f"--parsing-weights {path}: not a BiSeNet/ResNet-18 face parser with {n_classes} classes"
                         + (f"; missing: {head(missing)}" if missing else "")
                         + (f"; unexpected: {head(unexpected)}" if unexpected else "")
                         + (f"; wrong shape: {head(wrong)}" if wrong else ""))
    net.load_state_dict(state)
    return net.to(device).eval()


@torch.no_grad()
def parse_faces(net: BiSeNet, images: np.ndarray, *, input_size: int = 512) -> np.ndarray:
    """Label maps for RGB ``images [B, H, W, 3] uint8`` -> ``[B, H, W] uint8`` class indices.

    Images are resized to ``input_size`` (the parser's training resolution), and the logits back to
    ``H × W`` before the argmax.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"parse_faces: images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if input_size % 32:
        raise ValueError(f"parse_faces: input_size must be a multiple of 32, got {input_size}")
    device = next(net.parameters()).device
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    h, w = x.shape[2:]
    if (h, w) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    logits = net((x - mean) / std)
    if (h, w) != (input_size, input_size):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
