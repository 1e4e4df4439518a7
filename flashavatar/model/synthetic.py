"""A licence-free procedural head in the FLAME 2020 file format, and a synthetic subject rendered from it.

:func:`write_head_model` writes ``generic_model.pkl`` (same keys, shapes conventions and dtypes as FLAME
2020: 300 shape + 100 expression blendshapes, 5 joints, LBS weights, pose correctives, a sparse
``J_regressor``, ``shapedirs`` as a chumpy-typed object), ``head_template.obj`` (with UVs and a seam),
``l_eyelid.npy`` / ``r_eyelid.npy`` and ``texture.png``. Its topology is its own: a latitude/longitude head
with a neck opening, a 32-vertex lip ring (the mouth is a slit that the jaw joint opens), and two eyeballs.

:func:`make_subject` renders a whole dataset in the user-facing layout (SPEC §1)::

    <root>/<id>/imgs/00001.jpg  alpha/00001.jpg  parsing/00001_neckhead.png  parsing/00001_mouth.png
    <root>/tracker/<id>/checkpoint/00000.frame       (metrical-tracker dicts; frame k ↔ image k + 1)
    <root>/flame/generic_model.pkl  head_template.obj  l_eyelid.npy  r_eyelid.npy  texture.png
    <root>/<id>/subject.json                          (what was generated)

with a small z-buffer triangle rasteriser written here (NumPy, textured, Lambert-shaded, supersampled), a
mouth interior (teeth and a dark cavity behind the lip ring), a torso (in alpha, not in the head mask) and
a background; it is independent of the project's Gaussian rasteriser, so training on it measures something.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io_utils import atomic_write_bytes, atomic_write_with

log = logging.getLogger(__name__)

__all__ = ["HeadModel", "build_head", "write_head_model", "make_subject", "SubjectPaths", "render_frame_codes",
           "rasterize_triangles"]

# geometry constants (metres; y up, z forward (the face looks along +z), x toward the subject's left)
N_LON = 64           # vertices per latitude ring
N_HEAD_ROWS = 40     # rings from the top to the bottom of the head
N_NECK_ROWS = 6      # rings of the neck
PHI_BOTTOM = math.radians(140.0)
HEAD_AXES = np.array([0.078, 0.105, 0.095])
NECK_BOTTOM_Y = -0.21
MOUTH_Y = -0.045
MOUTH_HALF_COLS = 8   # lip line spans 2·8 + 1 columns: 15 inner vertices per lip + 2 corners = 32
EYE_RADIUS = 0.0125
EYE_XY = (0.032, 0.022)  # |x|, y of the eye centres
EYE_ROWS, EYE_COLS = 10, 14


# --------------------------------------------------------------------------------------- small utilities
def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _gauss(p, centre, sigma):
    d = (p - np.asarray(centre)) / np.asarray(sigma)
    return np.exp(-0.5 * (d * d).sum(-1))


def _rot_x(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot6d(R):
    return np.asarray(R)[:2].reshape(6)


# ------------------------------------------------------------------------------------------ head model
@dataclass
class HeadModel:
    v_template: np.ndarray   # [V, 3]
    faces: np.ndarray        # [F, 3]
    uvs: np.ndarray          # [T, 2]
    face_uvs: np.ndarray     # [F, 3]
    shapedirs: np.ndarray    # [V, 3, 400]
    posedirs: np.ndarray     # [V, 3, 36]
    J_regressor: np.ndarray  # [5, V] dense
    weights: np.ndarray      # [V, 5]
    eyelids: np.ndarray      # [2, V, 3] (left, right)
    lip_ring: np.ndarray     # [32] vertex indices of the mouth ring
    neck_ring: np.ndarray    # [N_LON] bottom ring
    eye_vertices: tuple      # (right eye indices, left eye indices)
    n_head_vertices: int = 0
    meta: dict = field(default_factory=dict)


def _head_grid():
    """Vertices, faces, UVs of the head + neck surface with the lip slit."""
    # longitudes: warped so the face (azimuth 0 = +z) is sampled ~2.5x denser than the back
    t = -math.pi + 2 * math.pi * (np.arange(N_LON) + 0.5) / N_LON
    az = t - 0.6 * np.sin(t)
    phis = np.linspace(0, PHI_BOTTOM, N_HEAD_ROWS + 1)[1:]
    rows_xyz = []
    for phi in phis:
        d = np.stack((np.sin(phi) * np.sin(az), np.full_like(az, np.cos(phi)), np.sin(phi) * np.cos(az)), -1)
        rows_xyz.append(d * HEAD_AXES)
    head_bottom = rows_xyz[-1]
    y0 = head_bottom[:, 1].mean()
    neck_r = np.stack((0.050 * np.sin(az), np.zeros_like(az), 0.055 * np.cos(az) - 0.012), -1)
    for k in range(1, N_NECK_ROWS + 1):
        s = k / N_NECK_ROWS
        w = _smoothstep(0.0, 0.6, s)
        ring = (1 - w) * head_bottom + w * neck_r
        ring[:, 1] = y0 + (NECK_BOTTOM_Y - y0) * s
        rows_xyz.append(ring)
    rows = np.stack(rows_xyz)  # [R, N_LON, 3]
    R = rows.shape[0]
    top = np.array([[0.0, HEAD_AXES[1], 0.0]])

    # radial features on the head part (displacement along the ellipsoid normal)
    P = rows.reshape(-1, 3)
    normal = P / HEAD_AXES ** 2
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    front = _smoothstep(0.0, 0.04, P[:, 2])
    bump = (0.022 * _gauss(P, (0, -0.008, 0.1), (0.011, 0.022, 1.0)) * front            # nose
            + 0.006 * _gauss(P, (0, 0.038, 0.1), (0.045, 0.007, 1.0)) * front           # brow ridge
            - 0.007 * (_gauss(P, (EYE_XY[0], EYE_XY[1], 0.1), (0.013, 0.010, 1.0))
                       + _gauss(P, (-EYE_XY[0], EYE_XY[1], 0.1), (0.013, 0.010, 1.0))) * front  # sockets
            + 0.005 * (_gauss(P, (0.042, -0.018, 0.1), (0.014, 0.014, 1.0))
                       + _gauss(P, (-0.042, -0.018, 0.1), (0.014, 0.014, 1.0))) * front  # cheeks
            + 0.007 * _gauss(P, (0, -0.088, 0.1), (0.018, 0.012, 1.0)) * front           # chin
            + 0.004 * _gauss(P, (0, MOUTH_Y, 0.1), (0.022, 0.008, 1.0)) * front          # lips
            + 0.012 * (_gauss(P, (0.078, 0.0, -0.01), (0.006, 0.018, 0.012))
                       + _gauss(P, (-0.078, 0.0, -0.01), (0.006, 0.018, 0.012))))       # ears
    head_rows = np.arange(R) < N_HEAD_ROWS
    bump = bump.reshape(R, N_LON) * head_rows[:, None]
    rows = rows + bump[..., None] * normal.reshape(R, N_LON, 3)

    # mouth slit: the ring row closest to MOUTH_Y at the front, columns around azimuth 0
    c_mid = N_LON // 2  # t closest to 0 is between N_LON/2 - 1 and N_LON/2; use N_LON/2
    r_m = int(np.argmin(np.abs(rows[:N_HEAD_ROWS, c_mid, 1] - MOUTH_Y)))
    cols = np.arange(c_mid - MOUTH_HALF_COLS, c_mid + MOUTH_HALF_COLS + 1)
    inner = cols[1:-1]
    prof = np.sin(np.pi * (np.arange(len(cols)) / (len(cols) - 1)))[1:-1]  # 0 at the corners
    verts = np.concatenate((top, rows.reshape(-1, 3)))
    vid = lambda r, c: 1 + r * N_LON + (c % N_LON)  # noqa: E731
    # lower lip: duplicates of the inner slit vertices, used by the faces below the slit
    dup_start = len(verts)
    lower = verts[[vid(r_m, c) for c in inner]].copy()
    verts[[vid(r_m, c) for c in inner], 1] += 0.0012 * prof  # a slightly open mouth at rest
    lower[:, 1] -= 0.0012 * prof
    lower[:, 2] -= 0.0005 * prof
    verts = np.concatenate((verts, lower))
    dup_of = {vid(r_m, c): dup_start + i for i, c in enumerate(inner)}

    # UVs: u along t (seam at the back: column N_LON repeats column 0 at u = 1), v from 1 (top) to 0.14
    v_of_row = 1.0 - 0.86 * (np.arange(R) + 1) / R
    u_of_col = (np.arange(N_LON + 1)) / N_LON
    uv = np.stack(np.meshgrid(u_of_col, v_of_row, indexing="xy"), -1).reshape(-1, 2)  # [R*(N_LON+1), 2]
    tid = lambda r, c: r * (N_LON + 1) + c  # noqa: E731
    top_uv_start = len(uv)
    uv = np.concatenate((uv, np.stack(((np.arange(N_LON) + 0.5) / N_LON, np.ones(N_LON)), -1)))

    faces, fuvs = [], []
    for c in range(N_LON):  # top fan (outward: counter-clockwise seen from above/outside)
        faces.append([0, vid(0, c + 1), vid(0, c)])
        fuvs.append([top_uv_start + c, tid(0, c + 1), tid(0, c)])
    for r in range(R - 1):
        for c in range(N_LON):
            a, b = vid(r, c), vid(r, c + 1)
            cc, d = vid(r + 1, c), vid(r + 1, c + 1)
            if r == r_m:  # faces below the slit use the lower-lip copies
                a, b = dup_of.get(a, a), dup_of.get(b, b)
            faces.append([a, b, d])
            faces.append([a, d, cc])
            ta, tb, tc_, td = tid(r, c), tid(r, c + 1), tid(r + 1, c), tid(r + 1, c + 1)
            fuvs.append([ta, tb, td])
            fuvs.append([ta, td, tc_])
    faces = np.asarray(faces, dtype=np.int64)
    fuvs = np.asarray(fuvs, dtype=np.int64)
    # orientation check: normals must point outward (away from the head's vertical axis)
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centre = tri.mean(1) * np.array([1, 0, 1])
    if (n * centre).sum(-1).mean() < 0:
        faces = faces[:, [0, 2, 1]]
        fuvs = fuvs[:, [0, 2, 1]]
    lip_upper = [vid(r_m, c) for c in cols]
    lip_lower = [dup_of[vid(r_m, c)] for c in inner]
    info = dict(r_m=r_m, mouth_cols=cols, lip_ring=np.asarray(lip_upper + lip_lower[::-1], dtype=np.int64),
                neck_ring=np.asarray([vid(R - 1, c) for c in range(N_LON)], dtype=np.int64),
                row_of_vertex=np.concatenate(([-1], np.repeat(np.arange(R), N_LON), np.full(len(inner), r_m))),
                is_lower_lip=np.concatenate((np.zeros(dup_start, bool), np.ones(len(inner), bool))))
    return verts, faces, uv, fuvs, info


def _eyeball(centre, uv_box):
    """A UV sphere with poles along ±z (front pole = pupil centre)."""
    th = np.linspace(0, math.pi, EYE_ROWS + 1)[1:-1]  # polar angle from the front pole
    ph = 2 * math.pi * np.arange(EYE_COLS) / EYE_COLS
    ring = np.stack((np.sin(th)[:, None] * np.cos(ph), np.sin(th)[:, None] * np.sin(ph),
                     np.cos(th)[:, None].repeat(EYE_COLS, 1)), -1).reshape(-1, 3)
    verts = np.concatenate(([[0, 0, 1.0]], ring, [[0, 0, -1.0]])) * EYE_RADIUS + centre
    nr = len(th)
    vid = lambda r, c: 1 + r * EYE_COLS + c % EYE_COLS  # noqa: E731
    last = 1 + nr * EYE_COLS
    u0, v0, u1, v1 = uv_box
    uv = [(u0 + (u1 - u0) * c / EYE_COLS, v1 - (v1 - v0) * (r + 1) / (nr + 1))
          for r in range(nr) for c in range(EYE_COLS + 1)]
    tid = lambda r, c: r * (EYE_COLS + 1) + c  # noqa: E731
    pole_uv = len(uv)
    uv += [(u0 + (u1 - u0) * (c + 0.5) / EYE_COLS, v1) for c in range(EYE_COLS)]
    uv += [(u0 + (u1 - u0) * (c + 0.5) / EYE_COLS, v0) for c in range(EYE_COLS)]
    faces, fuvs = [], []
    for c in range(EYE_COLS):
        faces.append([0, vid(0, c), vid(0, c + 1)])
        fuvs.append([pole_uv + c, tid(0, c), tid(0, c + 1)])
        faces.append([last, vid(nr - 1, c + 1), vid(nr - 1, c)])
        fuvs.append([pole_uv + EYE_COLS + c, tid(nr - 1, c + 1), tid(nr - 1, c)])
    for r in range(nr - 1):
        for c in range(EYE_COLS):
            a, b, cc, d = vid(r, c), vid(r, c + 1), vid(r + 1, c), vid(r + 1, c + 1)
            faces += [[a, cc, d], [a, d, b]]
            ta, tb, tc_, td = tid(r, c), tid(r, c + 1), tid(r + 1, c), tid(r + 1, c + 1)
            fuvs += [[ta, tc_, td], [ta, td, tb]]
    faces, fuvs = np.asarray(faces), np.asarray(fuvs)
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if (n * (tri.mean(1) - centre)).sum(-1).mean() < 0:
        faces, fuvs = faces[:, [0, 2, 1]], fuvs[:, [0, 2, 1]]
    return verts, faces, np.asarray(uv), fuvs


def _smooth_field(P, rng, n_rbf, amplitude, width):
    """A smooth random displacement field ``[V, 3]``: a few Gaussian RBFs with random 3D vectors."""
    out = np.zeros_like(P)
    idx = rng.integers(0, len(P), n_rbf)
    for c in P[idx]:
        out += rng.normal(size=3) * amplitude * _gauss(P, c, (width, width, width))[:, None]
    return out


def build_head(seed: int = 0) -> HeadModel:
    """Build the procedural head (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    hv, hf, huv, hfuv, info = _head_grid()
    n_head = len(hv)

    # eye centres: the eyeball's front pokes 3 mm out of the skin
    eyes_v, eyes_f, eyes_uv, eyes_fuv, eye_ids = [], [], [], [], []
    uv_boxes = {"right": (0.02, 0.01, 0.22, 0.12), "left": (0.26, 0.01, 0.46, 0.12)}
    offset_v, offset_t = n_head, len(huv)
    for side, sx in (("right", -1.0), ("left", 1.0)):  # joint 3 = right eye (−x), joint 4 = left (+x)
        ex, ey = sx * EYE_XY[0], EYE_XY[1]
        near = np.argsort(((hv[:, :2] - (ex, ey)) ** 2).sum(-1) + 10 * (hv[:, 2] < 0))[:4]
        z_skin = hv[near, 2].mean()
        centre = np.array([ex, ey, z_skin + 0.003 - EYE_RADIUS])
        v, f, uv, fuv = _eyeball(centre, uv_boxes[side])
        eyes_v.append(v)
        eyes_f.append(f + offset_v)
        eyes_uv.append(uv)
        eyes_fuv.append(fuv + offset_t)
        eye_ids.append(np.arange(offset_v, offset_v + len(v)))
        offset_v += len(v)
        offset_t += len(uv)
    verts = np.concatenate([hv] + eyes_v)
    faces = np.concatenate([hf] + eyes_f)
    uvs = np.concatenate([huv] + eyes_uv)
    fuvs = np.concatenate([hfuv] + eyes_fuv)
    V = len(verts)
    eye_centres = [verts[ids].mean(0) for ids in eye_ids]
    P = verts

    # skinning: eyes to their joints, jaw region to the jaw, neck rings blend root/neck
    row = np.concatenate((info["row_of_vertex"], np.full(V - n_head, -1)))
    weights = np.zeros((V, 5))
    neck_w = np.clip((row - (N_HEAD_ROWS - 1)) / N_NECK_ROWS, 0, 1) * (row >= 0)
    weights[:n_head, 0] = neck_w[:n_head]
    weights[:n_head, 1] = 1 - neck_w[:n_head]
    r_m = info["r_m"]
    az = np.arctan2(P[:, 0], P[:, 2])
    below = np.zeros(V, bool)
    below[:n_head] = (info["row_of_vertex"] > r_m) | info["is_lower_lip"]
    jaw = below * (1 - _smoothstep(math.radians(55), math.radians(95), np.abs(az)))
    jaw *= 1 - _smoothstep(N_HEAD_ROWS - 3, N_HEAD_ROWS + 1, row)  # fade out under the chin into the neck
    jaw[n_head:] = 0
    weights[:, 2] = jaw
    weights[:, :2] *= (1 - jaw)[:, None]
    weights[eye_ids[0], :] = 0
    weights[eye_ids[0], 3] = 1
    weights[eye_ids[1], :] = 0
    weights[eye_ids[1], 4] = 1

    # joint regressor: averages of vertex groups (so joints follow the shape)
    Jreg = np.zeros((5, V))
    neck_ring = info["neck_ring"]
    Jreg[0, neck_ring] = 1.0 / len(neck_ring)
    top_neck = 1 + (N_HEAD_ROWS - 1) * N_LON + np.arange(N_LON)
    Jreg[1, top_neck] = 1.0 / N_LON
    hinge_row = int(np.argmin(np.abs(hv[1 + np.arange(N_HEAD_ROWS) * N_LON + N_LON // 2, 1] - (-0.012))))
    ring = 1 + hinge_row * N_LON + np.arange(N_LON)
    sides = ring[np.argsort(np.abs(np.abs(az[ring]) - math.pi / 2))[:4]]
    Jreg[2, sides] = 0.25
    Jreg[3, eye_ids[0]] = 1.0 / len(eye_ids[0])
    Jreg[4, eye_ids[1]] = 1.0 / len(eye_ids[1])

    head_mask = np.zeros(V, bool)
    head_mask[:n_head] = True

    def rigid_eyes(field_):
        """Eyeballs move rigidly with the displacement at their centre (no distortion)."""
        for ids, c in zip(eye_ids, eye_centres):
            k = np.argsort(((hv - c) ** 2).sum(-1))[:6]
            field_[ids] = field_[k].mean(0)
        return field_

    # shape blendshapes: a few structured ones, then smooth random fields with decaying amplitude
    shapedirs = np.zeros((V, 3, 400))
    shapedirs[:, 0, 0] = 0.06 * P[:, 0]           # width
    shapedirs[:, 1, 1] = 0.05 * P[:, 1]           # height
    shapedirs[:, 2, 2] = 0.05 * P[:, 2]           # depth
    nose = _gauss(P, (0, -0.008, 0.11), (0.012, 0.022, 0.02)) * head_mask
    shapedirs[:, 2, 3] = 0.006 * nose             # nose length
    chin = _gauss(P, (0, -0.09, 0.08), (0.02, 0.015, 0.03)) * head_mask
    shapedirs[:, 1, 4] = -0.004 * chin            # chin length
    for k in range(5, 300):
        amp = 0.004 / (1 + (k - 5) / 8)
        f_ = _smooth_field(P, rng, 3, amp, 0.03)
        shapedirs[:, :, k] = f_ * head_mask[:, None]
    for k in range(300):
        shapedirs[:, :, k] = rigid_eyes(shapedirs[:, :, k].copy())

    # expression blendshapes (columns 300..399)
    front = head_mask * _smoothstep(0.0, 0.04, P[:, 2])
    corners = [P[info["lip_ring"][0]], P[info["lip_ring"][2 * MOUTH_HALF_COLS]]]
    smile = np.zeros((V, 3))
    for c in corners:
        g = _gauss(P, c, (0.014, 0.012, 0.03))[:, None] * front[:, None]
        smile += g * np.array([0.006 * np.sign(c[0]), 0.005, -0.004])
    shapedirs[:, :, 300] = smile
    brow = front * _gauss(P, (0, 0.045, 0.1), (0.05, 0.012, 1.0))
    shapedirs[:, 1, 301] = 0.006 * brow
    lips = front * _gauss(P, (0, MOUTH_Y, 0.1), (0.02, 0.012, 1.0))
    shapedirs[:, :, 302] = lips[:, None] * np.stack((-0.15 * P[:, 0] / 0.02, np.zeros(V), np.full(V, 1.0)), -1) * 0.005

    # eyelid closure (also used as expression blendshapes 303 (right) and 304 (left))
    eyelids = np.zeros((2, V, 3))
    for side_idx, (c, lid) in enumerate(((eye_centres[1], 0), (eye_centres[0], 1))):  # [0] left, [1] right
        d = P - c
        s = d[:, 0] / 0.019
        t_ = d[:, 1] / 0.016
        rad = np.sqrt(s * s + t_ * t_)
        t0 = -0.35  # the closed lid's lower edge: skin from t0 up is pulled over the eyeball
        sel = head_mask & (P[:, 2] > 0.02) & (t_ >= t0) & (rad < 1.0)
        w = (1 - _smoothstep(0.7, 1.0, rad)) * sel
        xs, ys = 0.97 * s, np.clip(-0.97 + 1.94 * (t_ - t0) / (1 - t0), -0.97, 0.97)
        zs = np.sqrt(np.clip(1 - xs * xs - ys * ys, 0.0, None))
        rho = EYE_RADIUS + 0.0015
        target = c + rho * np.stack((xs, ys, zs), -1)
        eyelids[lid] = w[:, None] * (target - P)
    shapedirs[:, :, 303] = eyelids[1]
    shapedirs[:, :, 304] = eyelids[0]
    cheek = front * (_gauss(P, (0.04, -0.02, 0.1), (0.016, 0.014, 1.0))
                     + _gauss(P, (-0.04, -0.02, 0.1), (0.016, 0.014, 1.0)))
    shapedirs[:, 1, 305] = 0.004 * cheek
    shapedirs[:, 2, 305] = 0.002 * cheek
    for k in range(306, 400):
        amp = 0.002 / (1 + (k - 306) / 10)
        shapedirs[:, :, k] = _smooth_field(P, rng, 2, amp, 0.02) * front[:, None]

    # pose correctives: small smooth fields on the jaw region for the jaw's (R − I) entries
    posedirs = np.zeros((V, 3, 36))
    for k in range(9, 18):
        posedirs[:, :, k] = _smooth_field(P, rng, 2, 0.003, 0.025) * jaw[:, None]

    meta = dict(eye_ids=[e.tolist() for e in eye_ids], n_head=n_head, r_m=r_m)
    return HeadModel(v_template=verts, faces=faces, uvs=uvs, face_uvs=fuvs, shapedirs=shapedirs,
                     posedirs=posedirs, J_regressor=Jreg, weights=weights, eyelids=eyelids,
                     lip_ring=info["lip_ring"], neck_ring=neck_ring, eye_vertices=tuple(eye_ids),
                     n_head_vertices=n_head, meta=meta)


# ----------------------------------------------------------------------------------------- file writing
class _ChumpyCh:
    """Pickles like a ``chumpy.ch.Ch`` object (state dict with the value in ``x``), as in FLAME 2020."""

    def __init__(self, x):
        self.x = np.asarray(x)

    def __reduce__(self):
        import copyreg
        return copyreg._reconstructor, (_ChumpyCh, object, None), {"x": self.x}


@contextmanager
def _fake_chumpy_module():
    """Make pickle record ``_ChumpyCh`` as ``chumpy.ch.Ch`` (only while writing; chumpy is not needed)."""
    if "chumpy" in sys.modules or "chumpy.ch" in sys.modules:
        raise RuntimeError("a real chumpy module is loaded; refusing to shadow it")
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    mod.Ch = _ChumpyCh
    pkg.ch = mod
    old = (_ChumpyCh.__module__, _ChumpyCh.__qualname__)
    _ChumpyCh.__module__, _ChumpyCh.__qualname__ = "chumpy.ch", "Ch"
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    try:
        yield
    finally:
        _ChumpyCh.__module__, _ChumpyCh.__qualname__ = old
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def flame_pickle_dict(head: HeadModel, *, chumpy_like: bool = True) -> dict:
    """The FLAME 2020 key set: numpy float64 arrays, ``f`` uint32, ``J_regressor`` scipy csc, ``shapedirs``
    chumpy-typed (when ``chumpy_like``), ``kintree_table`` with 2**32 − 1 as the root's parent."""
    import scipy.sparse as sp

    J = head.J_regressor @ head.v_template
    return {
        "v_template": head.v_template.astype(np.float64),
        "f": head.faces.astype(np.uint32),
        "shapedirs": _ChumpyCh(head.shapedirs) if chumpy_like else head.shapedirs,
        "posedirs": head.posedirs.astype(np.float64),
        "J_regressor": sp.csc_matrix(head.J_regressor),
        "weights": head.weights.astype(np.float64),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": J,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, uvs=None, face_uvs=None):
    lines = [f"v {x:.7f} {y:.7f} {z:.7f}" for x, y, z in vertices]
    if uvs is not None:
        lines += [f"vt {u:.7f} {v:.7f}" for u, v in uvs]
        lines += [f"f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}"
                  for (a, b, c), (ta, tb, tc) in zip(faces, face_uvs)]
    else:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def write_head_model(out_dir, *, seed: int = 0, chumpy_like: bool = True, texture_size: int = 512) -> Path:
    """Write the procedural head in FLAME 2020 format into ``out_dir``; returns the ``generic_model.pkl`` path.

    Files: ``generic_model.pkl``, ``head_template.obj`` (UVs), ``l_eyelid.npy``, ``r_eyelid.npy``,
    ``texture.png`` (the albedo used by :func:`make_subject`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = build_head(seed)
    data = flame_pickle_dict(head, chumpy_like=chumpy_like)
    if chumpy_like and ("chumpy" in sys.modules or "chumpy.ch" in sys.modules):
        log.info("chumpy is loaded: writing shapedirs as a plain array")
        data["shapedirs"] = head.shapedirs
        chumpy_like = False
    if chumpy_like:
        with _fake_chumpy_module():
            blob = pickle.dumps(data, protocol=2)
    else:
        blob = pickle.dumps(data, protocol=2)
    atomic_write_bytes(out / "generic_model.pkl", blob)
    write_obj(out / "head_template.obj", head.v_template, head.faces, head.uvs, head.face_uvs)
    for name, arr in (("l_eyelid.npy", head.eyelids[0]), ("r_eyelid.npy", head.eyelids[1])):
        atomic_write_with(out / name, lambda tmp, a=arr: np.save(open(tmp, "wb"), a.astype(np.float32)))
    tex = make_texture(head, texture_size)
    import imageio.v3 as iio
    atomic_write_with(out / "texture.png", lambda tmp: iio.imwrite(tmp, tex, extension=".png"))
    return out / "generic_model.pkl"


# --------------------------------------------------------------------------------------------- texture
def _value_noise(P, seed, n_terms=10, freq=(40.0, 260.0)):
    rng = np.random.default_rng(seed)
    out = np.zeros(len(P))
    for _ in range(n_terms):
        w = rng.normal(size=3)
        w *= rng.uniform(*freq) / np.linalg.norm(w)
        out += np.sin(P @ w + rng.uniform(0, 2 * np.pi))
    return out / math.sqrt(n_terms)


def _albedo(P, is_eye, eye_centre, seed=0):
    """Procedural albedo ``[N, 3]`` for canonical surface points ``P [N, 3]``."""
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    az = np.arctan2(x, z)
    n1, n2 = _value_noise(P, seed, freq=(30, 80)), _value_noise(P, seed + 1, freq=(150, 400))
    col = np.array([0.86, 0.64, 0.53]) * (1 + 0.035 * n1[:, None] + 0.02 * n2[:, None])
    cheeks = (_gauss(P, (0.042, -0.02, 0.08), (0.014, 0.012, 0.05))
              + _gauss(P, (-0.042, -0.02, 0.08), (0.014, 0.012, 0.05)))
    col += cheeks[:, None] * np.array([0.06, -0.04, -0.03])
    col *= (1 - 0.06 * _smoothstep(-0.08, -0.14, y))[:, None]  # neck a little darker
    # lips
    half = 0.027
    lipw = 0.0065 * np.clip(1 - (x / half) ** 2, 0, 1)
    lips = (np.abs(y - MOUTH_Y) < lipw) & (z > 0.04)
    col[lips] = np.array([0.72, 0.34, 0.34]) * (1 + 0.03 * n2[lips, None])
    # eyebrows
    ax = np.abs(x)
    browline = 0.044 + 0.006 * np.sin(np.pi * np.clip((ax - 0.012) / 0.042, 0, 1))
    brows = (ax > 0.012) & (ax < 0.056) & (np.abs(y - browline) < 0.0042) & (z > 0.03)
    col[brows] = np.array([0.24, 0.16, 0.11]) * (1 + 0.15 * n2[brows, None])
    # hair: above a hairline that drops from the forehead to the back of the neck; ears stay skin
    hairline = 0.064 - 0.10 * _smoothstep(math.radians(35), math.radians(125), np.abs(az)) + 0.004 * np.sin(9 * az)
    ears = (ax > 0.068) & (np.abs(y) < 0.03) & (z > -0.035) & (z < 0.02)
    hair = (y > hairline) & ~ears & (y > -0.115)
    strands = 0.8 + 0.25 * np.sin(85 * az + 30 * y + 2 * n1)
    col[hair] = np.array([0.25, 0.16, 0.09]) * strands[hair, None]
    # eyes: sclera, iris, pupil around the front pole of each eyeball
    if is_eye.any():
        d = P[is_eye] - eye_centre[is_eye]
        ang = np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=-1), -1, 1))
        ph = np.arctan2(d[:, 1], d[:, 0])
        e = np.tile(np.array([0.94, 0.92, 0.88]), (len(d), 1))
        e *= (1 - 0.15 * _smoothstep(0.9, 1.6, ang))[:, None]
        iris = ang < 0.42
        e[iris] = np.array([0.22, 0.42, 0.56]) * (0.75 + 0.25 * np.sin(24 * ph[iris]))[:, None]
        e[ang < 0.17] = 0.03
        col[is_eye] = e
    return np.clip(col, 0, 1)


def make_texture(head: HeadModel, size: int = 512) -> np.ndarray:
    """Albedo texture ``[size, size, 3]`` uint8 in OBJ UV space (row 0 = v 1)."""
    from scipy import ndimage

    from .avatar import rasterize_uv

    s = rasterize_uv(head.uvs, head.face_uvs, size)
    tri = head.v_template[head.faces[s.face_ids]]
    P = (tri * s.barycentrics[..., None]).sum(1)
    vid = head.faces[s.face_ids, 0]
    is_eye = vid >= head.n_head_vertices
    centres = np.zeros_like(P)
    for ids in head.eye_vertices:
        m = np.isin(vid, ids)
        centres[m] = head.v_template[ids].mean(0)
    col = _albedo(P, is_eye, centres)
    img = np.zeros((size, size, 3))
    covered = np.zeros((size, size), bool)
    rows = size - 1 - s.texel[:, 1]
    img[rows, s.texel[:, 0]] = col
    covered[rows, s.texel[:, 0]] = True
    _, (ri, ci) = ndimage.distance_transform_edt(~covered, return_indices=True)  # pad charts (bilinear seams)
    img = img[ri, ci]
    return (img * 255 + 0.5).astype(np.uint8)


def _sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup ``[N, 3]`` float of ``tex [S, S, 3]`` uint8 at ``uv [N, 2]``."""
    S_h, S_w = tex.shape[:2]
    x = np.clip(uv[:, 0] * S_w - 0.5, 0, S_w - 1)
    y = np.clip((1 - uv[:, 1]) * S_h - 0.5, 0, S_h - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, S_w - 1), np.minimum(y0 + 1, S_h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    t = tex.astype(np.float32) * np.float32(1 / 255.0)
    return (t[y0, x0] * (1 - fx) * (1 - fy) + t[y0, x1] * fx * (1 - fy)
            + t[y1, x0] * (1 - fx) * fy + t[y1, x1] * fx * fy)


# ------------------------------------------------------------------------------------------- rasteriser
@contextmanager
def _torch_threads(n: int):
    """Small tensors: thread start-up costs more than it gains (and the machine may be shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rasterize_triangles(cam_verts: np.ndarray, faces: np.ndarray, K: np.ndarray, height: int, width: int,
                        cull_back: np.ndarray | None = None, near: float = 0.01):
    """Z-buffer rasterisation of triangles given in camera coordinates (OpenCV).

    ``cam_verts [V, 3]``, ``faces [F, 3]``, ``K [3, 3]``; pixel (i, j) is sampled at its centre
    (i + 0.5, j + 0.5). ``cull_back [F]`` bool: drop those faces when they face away from the camera.
    Returns NumPy ``face_id [H, W]`` (−1 = empty), perspective-correct ``bary [H, W, 3]``, ``depth [H, W]``.
    Every face enumerates the pixel centres of its bounding box (vectorised, in torch for speed); the
    nearest candidate per pixel wins (scatter-min of depth, ties to the lowest candidate).
    """
    with _torch_threads(1):
        return _rasterize_triangles(cam_verts, faces, K, height, width, cull_back, near)


def _rasterize_triangles(cam_verts, faces, K, height, width, cull_back, near):
    H, W = height, width
    v = torch.as_tensor(cam_verts, dtype=torch.float64)
    f_all = torch.as_tensor(np.asarray(faces), dtype=torch.long)
    z = v[:, 2]
    zs = z.clamp_min(1e-9)
    px = torch.stack((K[0, 0] * v[:, 0] / zs + K[0, 2], K[1, 1] * v[:, 1] / zs + K[1, 2]), -1)
    tri_z = z[f_all]
    keep = (tri_z > near).all(1)
    if cull_back is not None:
        tri3 = v[f_all]
        n = torch.cross(tri3[:, 1] - tri3[:, 0], tri3[:, 2] - tri3[:, 0], dim=-1)
        facing = (n * tri3.mean(1)).sum(-1) < 0
        keep &= facing | ~torch.as_tensor(cull_back)
    fidx = torch.nonzero(keep)[:, 0]
    tri = px[f_all[fidx]]  # [F', 3, 2]
    bounds = torch.tensor([W - 1, H - 1], dtype=torch.float64)
    lo = torch.minimum(torch.ceil(tri.min(1).values - 0.5).clamp_min(0), bounds + 1).long()
    hi = torch.minimum(torch.floor(tri.max(1).values - 0.5), bounds).clamp_min(-1).long()
    nx, ny = (hi[:, 0] - lo[:, 0] + 1).clamp_min(0), (hi[:, 1] - lo[:, 1] + 1).clamp_min(0)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    counts = torch.where(area2.abs() > 1e-12, nx * ny, 0)
    face_id = np.full(H * W, -1, np.int64)
    bary = np.zeros((H * W, 3), np.float32)
    depth = np.full(H * W, np.inf, np.float32)
    total = int(counts.sum())
    if total == 0:
        return face_id.reshape(H, W), bary.reshape(H, W, 3), depth.reshape(H, W)
    f = torch.repeat_interleave(torch.arange(len(fidx)), counts, output_size=total)
    local = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
    nxf = nx[f]
    ix = lo[f, 0] + local % nxf
    iy = lo[f, 1] + torch.div(local, nxf, rounding_mode="floor")
    tri32, e1, e2 = tri.float(), e1.float(), e2.float()
    inv_area = (1.0 / torch.where(area2 == 0, 1.0, area2)).float()
    px_ = (ix.float() + 0.5) - tri32[f, 0, 0]
    py_ = (iy.float() + 0.5) - tri32[f, 0, 1]
    l1 = (px_ * e2[f, 1] - py_ * e2[f, 0]) * inv_area[f]
    l2 = (e1[f, 0] * py_ - e1[f, 1] * px_) * inv_area[f]
    inside = (l1 >= 0) & (l2 >= 0) & (l1 + l2 <= 1)
    f, ix, iy, l1, l2 = f[inside], ix[inside], iy[inside], l1[inside], l2[inside]
    bz = torch.stack((1 - l1 - l2, l1, l2), -1) / tri_z[fidx[f]].float()  # perspective-correct weights
    d = 1.0 / bz.sum(-1)
    pix = iy * W + ix
    zbuf = torch.full((H * W,), float("inf")).scatter_reduce_(0, pix, d, "amin")
    cand = torch.nonzero(d == zbuf[pix])[:, 0]
    first = torch.full((H * W,), len(pix), dtype=torch.long).scatter_reduce_(0, pix[cand], cand, "amin")
    hit = first < len(pix)
    sel = first[hit]
    hit_np = hit.numpy()
    face_id[hit_np] = fidx[f[sel]].numpy()
    bary[hit_np] = (bz[sel] / bz[sel].sum(-1, keepdim=True)).numpy()
    depth[hit_np] = d[sel].numpy()
    return face_id.reshape(H, W), bary.reshape(H, W, 3), depth.reshape(H, W)


def _vertex_normals(v, f):
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, f[:, k], n)
    return vn / np.maximum(np.linalg.norm(vn, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=2)
def _torso_mesh(n_around=48, n_down=10):
    """An elliptic cylinder with a domed top (shoulders), closed on top."""
    a = 2 * np.pi * np.arange(n_around) / n_around
    rings = []
    for k, yy in enumerate(np.linspace(-0.175, -0.55, n_down)):
        w = 0.6 + 0.4 * _smoothstep(-0.175, -0.26, yy)
        rings.append(np.stack((0.19 * w * np.sin(a), np.full_like(a, yy), 0.11 * w * np.cos(a) - 0.02), -1))
    verts = [np.array([[0.0, -0.16, -0.02]])] + rings
    v = np.concatenate(verts)
    faces = [[0, 1 + (c + 1) % n_around, 1 + c] for c in range(n_around)]
    for r in range(n_down - 1):
        for c in range(n_around):
            a0, b0 = 1 + r * n_around + c, 1 + r * n_around + (c + 1) % n_around
            a1, b1 = a0 + n_around, b0 + n_around
            faces += [[a0, b0, b1], [a0, b1, a1]]
    f = np.asarray(faces)
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if (n * (tri.mean(1) - [0, -0.3, -0.02]) * [1, 0, 1]).sum(-1).mean() < 0:
        f = f[:, [0, 2, 1]]
    return v, f


_LIGHT = np.array([0.35, 0.55, 1.0]) / np.linalg.norm([0.35, 0.55, 1.0])


@functools.lru_cache(maxsize=4)
def _background(Hs: int, Ws: int, seed: int) -> np.ndarray:
    """A soft grey-blue wall gradient ``[Hs*Ws, 3]`` float32 (what the matting alpha removes)."""
    yy = (np.arange(Hs) + 0.5)[:, None] / Hs
    xx = (np.arange(Ws) + 0.5)[None, :] / Ws
    bg = np.stack(np.broadcast_arrays(0.60 - 0.12 * yy + 0.03 * np.sin(9 * xx + seed), 0.63 - 0.12 * yy + 0 * xx,
                                      0.69 - 0.10 * yy + 0.02 * np.cos(7 * xx)), -1)
    return bg.reshape(-1, 3).astype(np.float32)


def render_frame_codes(head: HeadModel, tex: np.ndarray, verts: np.ndarray, viewmat: np.ndarray, K: np.ndarray,
                       height: int, width: int, supersample: int = 2, background_seed: int = 0) -> dict:
    """Render one frame of the posed head ``verts [V, 3]`` (world, metres).

    Returns ``image [H, W, 3]`` uint8 (with the background), ``alpha [H, W]`` float in [0, 1] (head, neck and
    torso), ``head_mask [H, W]`` bool (head, neck, eyes, mouth interior; no torso), ``mouth_mask [H, W]`` bool.
    """
    ss = int(supersample)
    Hs, Ws = height * ss, width * ss
    Ks = K.copy().astype(np.float64)
    Ks[:2] *= ss
    # scene: head + eyes (textured), mouth cavity, torso
    hv, hf = verts, head.faces
    ring = head.lip_ring
    L = verts[ring]
    c = L.mean(0)
    back = c + 0.55 * (L - c) - np.array([0.0, 0.0, 0.02])
    floor_c = back.mean(0) - np.array([0.0, 0.0, 0.004])
    n = len(ring)
    cav_v = np.concatenate((L, back, floor_c[None]))
    cav_f = [[k, (k + 1) % n, n + (k + 1) % n] for k in range(n)] + [[k, n + (k + 1) % n, n + k] for k in range(n)]
    cav_f += [[n + k, n + (k + 1) % n, 2 * n] for k in range(n)]
    cav_f = np.asarray(cav_f)
    cav_t = np.concatenate((np.zeros(n), np.ones(n), [1.3]))
    tv, tf = _torso_mesh()
    nh = len(hv)
    all_v = np.concatenate((hv, cav_v, tv))
    all_f = np.concatenate((hf, cav_f + nh, tf + nh + len(cav_v)))
    material = np.concatenate((np.zeros(len(hf), np.int64), np.ones(len(cav_f), np.int64), np.full(len(tf), 2)))
    cam = all_v @ viewmat[:3, :3].T + viewmat[:3, 3]
    face_id, bary, _ = rasterize_triangles(cam, all_f, Ks, Hs, Ws, cull_back=material != 1)

    hit = face_id >= 0
    fid = face_id[hit]
    b = bary[hit]
    mat = material[fid]
    colour = np.zeros((len(fid), 3), np.float32)
    normals = np.concatenate((_vertex_normals(hv, hf), np.zeros((len(cav_v), 3)), _vertex_normals(tv, tf)))
    nrm = (normals[all_f[fid]] * b[..., None]).sum(1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
    shade = 0.5 + 0.55 * np.clip(nrm @ _LIGHT, 0, 1)
    m0 = mat == 0
    uv = (head.uvs[head.face_uvs[fid[m0]]] * b[m0][..., None]).sum(1)
    colour[m0] = _sample_texture(tex, uv) * shade[m0, None]
    m1 = mat == 1
    t = (cav_t[all_f[fid[m1]] - nh] * b[m1]).sum(-1)
    teeth = np.array([0.93, 0.91, 0.84])
    cavity = np.array([0.32, 0.07, 0.09]) * (1.1 - 0.5 * np.clip(t, 0, 1.3))[:, None]
    colour[m1] = np.where((t < 0.28)[:, None], teeth, cavity)
    m2 = mat == 2
    colour[m2] = np.array([0.22, 0.3, 0.52]) * shade[m2, None]

    fg = hit.ravel()
    img = _background(Hs, Ws, background_seed).copy()  # [Hs*Ws, 3] float32
    img[fg] = colour
    is_head = np.zeros(Hs * Ws, np.float32)
    is_mouth = np.zeros(Hs * Ws, np.float32)
    is_head[fg] = mat != 2
    is_mouth[fg] = m1

    def box(a):  # [Hs*Ws, ...] -> [H, W, ...] box filter (= anti-aliasing)
        a = a.reshape(height, ss, width, ss, *a.shape[1:])
        return a.sum(3).sum(1) / (ss * ss)
    image = box(img)
    alpha = box(fg.astype(np.float32))
    head_mask = box(is_head) >= 0.5
    mouth_mask = box(is_mouth) >= 0.5
    return {"image": (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "alpha": alpha,
            "head_mask": head_mask, "mouth_mask": mouth_mask}


# ------------------------------------------------------------------------------------------ the subject
@dataclass
class SubjectPaths:
    """Where :func:`make_subject` put things (pass these to the dataset reader and to FLAME)."""

    data_root: Path      # <root>; images under <root>/<subject_id>/
    tracker_root: Path   # <root>/tracker; frames under <tracker_root>/<subject_id>/checkpoint/
    subject_id: str
    model_path: Path     # generic_model.pkl
    template_obj: Path   # head_template.obj
    n_frames: int
    height: int
    width: int


def subject_codes(n_frames: int, seed: int = 0) -> dict:
    """Per-frame FLAME codes of the synthetic performance (float64 numpy, tracker conventions): a fixed
    identity; jaw opening (bursts and speech-like flutter); smile, brow raise and pucker cycles; blinks and
    a wink; gaze. Periods are incommensurate so any contiguous tail of frames (the test split) sees the
    same range of expressions as the rest."""
    rng = np.random.default_rng(seed + 101)
    t = np.arange(n_frames, dtype=np.float64)
    shape = np.zeros(300)
    shape[:20] = rng.normal(size=20) * 0.8
    expr = np.zeros((n_frames, 100))
    pos = lambda x: np.clip(x, 0, None)  # noqa: E731
    expr[:, 0] = 1.6 * pos(np.sin(2 * np.pi * t / 61 + 1.0)) ** 1.5       # smile
    expr[:, 1] = 1.5 * pos(np.sin(2 * np.pi * t / 37 + 2.0)) ** 1.5       # brow raise
    expr[:, 2] = 0.9 * np.sin(2 * np.pi * t / 53 + 0.3)                   # pucker / stretch
    expr[:, 5] = 1.0 * pos(np.sin(2 * np.pi * t / 43 + 0.7))              # cheek raise
    phases = rng.uniform(0, 2 * np.pi, size=(94, 2))
    periods = rng.uniform(20, 90, size=94)
    expr[:, 6:] = 0.3 * np.sin(2 * np.pi * t[:, None] / periods + phases[:, 0]) / (1 + np.arange(94) / 10)
    jaw_angle = 0.30 * pos(np.sin(2 * np.pi * t / 47)) ** 2 + 0.06 * pos(np.sin(2 * np.pi * t / 7.3)) \
        * pos(np.sin(2 * np.pi * t / 29 + 1.3))
    jaw = np.stack([_rot6d(_rot_x(a)) for a in jaw_angle])
    gaze_yaw = 0.22 * np.sin(2 * np.pi * t / 41 + 0.5)
    gaze_pitch = 0.10 * np.sin(2 * np.pi * t / 67 + 1.5)
    eye = np.stack([_rot6d(_rot_y(a) @ _rot_x(b)) for a, b in zip(gaze_yaw, gaze_pitch)])
    eyes = np.concatenate((eye, eye), axis=1)
    eyelids = np.zeros((n_frames, 2))
    profile = np.array([0.35, 0.8, 1.0, 0.8, 0.35])
    for start in range(7, n_frames, 29):
        k = slice(start, min(n_frames, start + len(profile)))
        which = [0, 1] if (start // 29) % 5 else [0]  # every fifth blink is a wink of the left eye
        for w in which:
            eyelids[k, w] = profile[: k.stop - k.start]
    return {"shape": shape, "expr": expr, "jaw": jaw, "eyes": eyes, "eyelids": eyelids}


def subject_cameras(n_frames: int, height: int, width: int):
    """OpenCV cameras orbiting the head: ``viewmats [T, 4, 4]``, ``K [3, 3]`` (off-centre principal point)."""
    from .camera import fov_focal, look_at_opencv

    t = np.arange(n_frames, dtype=np.float64)
    f = fov_focal(30.0, height)
    K = np.array([[f, 0, 0.515 * width], [0, f * 1.0, 0.49 * height], [0, 0, 1.0]])
    views = []
    for k in t:
        yaw = math.radians(28) * math.sin(2 * math.pi * k / 83)
        pitch = math.radians(9) * math.sin(2 * math.pi * k / 59 + 0.4)
        dist = 0.62 + 0.04 * math.sin(2 * math.pi * k / 71)
        eye = dist * np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
        roll = math.radians(4) * math.sin(2 * math.pi * k / 97)
        up = np.array([math.sin(roll), math.cos(roll), 0.0])
        views.append(look_at_opencv(eye + [0, -0.03, 0], [0, -0.035, 0], up))
    return np.stack(views), K


def tracker_frame_dict(codes: dict, k: int, viewmat: np.ndarray, K: np.ndarray, height: int, width: int) -> dict:
    """A metrical-tracker checkpoint dict for frame ``k`` (numpy float32, batch 1)."""
    from .camera import pytorch3d_from_opencv

    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    R, tvec = viewmat[:3, :3], viewmat[:3, 3]
    Rp, Tp, fl, pp = pytorch3d_from_opencv(R[None], tvec[None], K[None], [[height, width]])
    return {
        "flame": {"exp": f32(codes["expr"][k][None]), "shape": f32(codes["shape"][None]),
                  "tex": np.zeros((1, 50), np.float32), "sh": np.zeros((1, 9, 3), np.float32),
                  "eyes": f32(codes["eyes"][k][None]), "eyelids": f32(codes["eyelids"][k][None]),
                  "jaw": f32(codes["jaw"][k][None])},
        "camera": {"R": f32(Rp.numpy()[:, :2].reshape(1, 6)), "t": f32(Tp.numpy()), "fl": f32(fl.numpy()[:, :1]),
                   "pp": f32(pp.numpy())},
        "opencv": {"R": f32(R[None]), "t": f32(tvec[None]), "K": f32(K[None])},
        "img_size": np.array([height, width], dtype=np.int64),
        "frame_id": int(k),
        "global_step": int(k) * 100,
    }


_JOB = None  # what the render workers need (set by make_subject / the pool initialiser)


def _init_worker(job):
    global _JOB
    _JOB = job
    torch.set_num_threads(1)


def _render_and_write(frames: list[int]) -> int:
    import imageio.v3 as iio

    head, tex, verts, viewmats, K, height, width, supersample, subj = _JOB
    for k in frames:
        out = render_frame_codes(head, tex, verts[k], viewmats[k], K, height, width, supersample)
        name = f"{k + 1:05d}"
        atomic_write_with(subj / "imgs" / f"{name}.jpg",
                     lambda p: iio.imwrite(p, out["image"], extension=".jpg", quality=95))
        alpha8 = (out["alpha"] * 255 + 0.5).astype(np.uint8)
        atomic_write_with(subj / "alpha" / f"{name}.jpg", lambda p: iio.imwrite(p, alpha8, extension=".jpg", quality=95))
        for part, m in (("neckhead", out["head_mask"]), ("mouth", out["mouth_mask"])):
            atomic_write_with(subj / "parsing" / f"{name}_{part}.png",
                         lambda p, m=m: iio.imwrite(p, m.astype(np.uint8) * 255, extension=".png"))
    return len(frames)


def make_subject(root, subject_id: str = "synthetic", *, n_frames: int = 240, size=256, seed: int = 0,
                 supersample: int = 2, model_dir=None, progress: bool = False, workers: int | None = None
                 ) -> SubjectPaths:
    """Write a synthetic subject (see the module docstring for the layout).

    ``size``: int (square) or ``(height, width)``. The default (240 frames, 256², supersample 2) takes well
    under a minute on 2 cores; the head model goes to ``model_dir`` (default ``<root>/flame``) and is
    reused when it is already there. ``workers``: render processes (default: the CPU count, at most 8 and one
    per 16 frames; spawned, so a script calling this needs the usual ``if __name__ == "__main__":`` guard).
    """
    import imageio.v3 as iio
    import torch

    from .flame import FLAME

    t0 = time.time()
    root = Path(root)
    height, width = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if n_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"make_subject: need n_frames >= 1 and size >= 8, got {n_frames}, {height}x{width}")
    model_dir = Path(model_dir) if model_dir is not None else root / "flame"
    model_path = model_dir / "generic_model.pkl"
    if not (model_path.is_file() and (model_dir / "texture.png").is_file()):
        write_head_model(model_dir, seed=seed)
    head = build_head(seed)
    tex = iio.imread(model_dir / "texture.png")[..., :3]
    flame = FLAME(model_path).double()
    if flame.n_vertices != len(head.v_template):
        raise ValueError(f"{model_path}: not the procedural head of seed {seed} (delete {model_dir} to rebuild)")

    codes = subject_codes(n_frames, seed)
    viewmats, K = subject_cameras(n_frames, height, width)
    with torch.no_grad():  # posed meshes [T, V, 3] float32, in chunks (LBS holds [chunk, V, 3, 3])
        T = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        verts = np.concatenate([
            flame(T(codes["shape"])[None], T(codes["expr"][i:i + 256]), T(codes["jaw"][i:i + 256]),
                  T(codes["eyes"][i:i + 256]), T(codes["eyelids"][i:i + 256])).float().numpy()
            for i in range(0, n_frames, 256)])

    subj = root / subject_id
    ckpt = root / "tracker" / subject_id / "checkpoint"
    for d in (subj / "imgs", subj / "alpha", subj / "parsing", ckpt):
        d.mkdir(parents=True, exist_ok=True)
    for k in range(n_frames):
        frame = tracker_frame_dict(codes, k, viewmats[k], K, height, width)
        atomic_write_with(ckpt / f"{k:05d}.frame", lambda p, fr=frame: torch.save(fr, p))

    # the renderer needs only the topology and UVs, not the blendshapes
    light = HeadModel(head.v_template, head.faces, head.uvs, head.face_uvs, np.zeros((0, 3, 0)), np.zeros((0, 3, 0)),
                      np.zeros((5, 0)), np.zeros((0, 5)), np.zeros((2, 0, 3)), head.lip_ring, head.neck_ring,
                      head.eye_vertices, head.n_head_vertices)
    job = (light, tex, verts, viewmats, K, height, width, supersample, subj)
    workers = max(1, min(int(workers if workers is not None else (os.cpu_count() or 1)), 8, n_frames // 16 or 1))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_frames, desc=f"synth {subject_id}", unit="frame")
    global _JOB
    try:
        if workers > 1:  # spawned (not forked: this process has torch threads), each gets the job once
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                for done in pool.imap_unordered(_render_and_write, [[k] for k in range(n_frames)], chunksize=4):
                    if bar is not None:
                        bar.update(done)
        else:
            _JOB = job
            for k in range(n_frames):
                _render_and_write([k])
                if bar is not None:
                    bar.update(1)
    finally:
        _JOB = None
        if bar is not None:
            bar.close()
    meta = {"subject_id": subject_id, "n_frames": n_frames, "height": height, "width": width, "seed": seed,
            "supersample": supersample, "model_dir": str(model_dir), "seconds": round(time.time() - t0, 2)}
    atomic_write_bytes(subj / "subject.json", json.dumps(meta, indent=2).encode())
    log.info("synthetic subject %s: %d frames %dx%d in %.1fs", subject_id, n_frames, height, width, time.time() - t0)
    return SubjectPaths(root, root / "tracker", subject_id, model_path, model_dir / "head_template.obj",
                        n_frames, height, width)
