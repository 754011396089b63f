"""Procedural radiograph, CT and MR images for the synthetic archive.

Everything is drawn on a small canvas (long side ~256 px) as a projection:
soft tissue and bones are solids whose X-ray path length ("chord") is summed.
A long bone is a hollow tube (dense cortical shell around a lighter medulla),
which gives the bright edges and darker centre of real bones.  The caller
upsamples the result to the archive's pixel size and adds noise there.

Display convention of every function here: float32 in [0, 1], bone bright
(what a MONOCHROME2 image shows).  The optional focal lesion is a round lytic
lucency with a thin sclerotic rim, placed inside a bone that is wide enough,
with a diameter of about 6-12 % of the canvas' short side, so it stays visible
when the image is shrunk to 128 px.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

RADIOGRAPH_PARTS = ("hand", "knee", "chest", "foot", "pelvis", "spine", "shoulder")
# Canvas aspect (height / width) ranges per body part.
ASPECT = {
    "hand": (1.15, 1.35), "knee": (1.1, 1.3), "chest": (0.8, 1.0), "foot": (0.7, 0.85),
    "pelvis": (0.72, 0.85), "spine": (1.5, 2.0), "shoulder": (0.85, 1.05),
}
MU_SOFT, MU_CORTEX, MU_MEDULLA = 1.1, 14.0, 4.0


class Canvas:
    """Accumulates soft-tissue and bone path lengths on a small grid.

    Coordinates are given in canvas units: x in [0, w/s], y in [0, h/s] with
    ``s`` = short side, so a radius of 0.05 is 5 % of the short side.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w, self.rng = h, w, rng
        self.s = float(min(h, w))
        self.soft = np.zeros((h, w), np.float32)
        self.bone = np.zeros((h, w), np.float32)
        self.hosts: list[tuple[float, float, float]] = []  # (y, x, local bone radius) lesion sites

    @property
    def W(self) -> float:  # width in canvas units
        return self.w / self.s

    @property
    def H(self) -> float:
        return self.h / self.s

    # -- geometry helpers ------------------------------------------------------------------
    def _box(self, y0, y1, x0, x1):
        s = self.s
        r0, r1 = max(int(math.floor(y0 * s)) - 1, 0), min(int(math.ceil(y1 * s)) + 2, self.h)
        c0, c1 = max(int(math.floor(x0 * s)) - 1, 0), min(int(math.ceil(x1 * s)) + 2, self.w)
        if r0 >= r1 or c0 >= c1:
            return None
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        return (slice(r0, r1), slice(c0, c1)), (yy + 0.5) / s, (xx + 0.5) / s

    def _seg_dist(self, p0, p1, r):
        (y0, x0), (y1, x1) = p0, p1
        box = self._box(min(y0, y1) - r, max(y0, y1) + r, min(x0, x1) - r, max(x0, x1) + r)
        if box is None:
            return None, None
        sl, yy, xx = box
        dy, dx = y1 - y0, x1 - x0
        L2 = dy * dy + dx * dx + 1e-12
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / L2, 0, 1)
        d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        return sl, d

    def _ell_q(self, c, a, b, ang, pad=0.0):
        cy, cx = c
        R = max(a, b) + pad
        box = self._box(cy - R, cy + R, cx - R, cx + R)
        if box is None:
            return None, None
        sl, yy, xx = box
        ca, sa = math.cos(ang), math.sin(ang)
        u = (xx - cx) * ca + (yy - cy) * sa
        v = -(xx - cx) * sa + (yy - cy) * ca
        return sl, (u, v)

    @staticmethod
    def _chord(d, r):
        return 2.0 * np.sqrt(np.maximum(r * r - d * d, 0.0))

    # -- primitives -------------------------------------------------------------------------
    def soft_capsule(self, p0, p1, r, mu=MU_SOFT):
        sl, d = self._seg_dist(p0, p1, r)
        if sl is not None:
            self.soft[sl] += mu * self._chord(d, r)

    def soft_ellipse(self, c, a, b, ang=0.0, mu=MU_SOFT, depth=None):
        sl, uv = self._ell_q(c, a, b, ang)
        if sl is not None:
            u, v = uv
            q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            dep = min(a, b) if depth is None else depth
            self.soft[sl] += mu * 2 * dep * np.sqrt(np.maximum(1 - q * q, 0))

    def bone_capsule(self, p0, p1, r, cortex=0.25, host=False):
        """A tubular bone from p0 to p1 of radius r; cortex = shell thickness / r."""
        sl, d = self._seg_dist(p0, p1, r)
        if sl is None:
            return
        ri = r * (1 - cortex)
        outer, inner = self._chord(d, r), self._chord(d, ri)
        self.bone[sl] += MU_CORTEX * (outer - inner) + MU_MEDULLA * inner
        self.soft[sl] += MU_SOFT * 0.3 * outer
        if host:
            for t in (0.25, 0.4, 0.55, 0.7):
                self.hosts.append((p0[0] + t * (p1[0] - p0[0]), p0[1] + t * (p1[1] - p0[1]), r))

    def bone_ellipse(self, c, a, b, ang=0.0, cortex=0.2, host=False, power=2.0, depth=None, flat=False):
        """An ellipsoidal (or rounded-box with power > 2) bone; ``flat`` bones have uniform depth."""
        sl, uv = self._ell_q(c, a, b, ang)
        if sl is None:
            return
        u, v = uv
        q = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1 / power)
        ai, bi = a - cortex * min(a, b), b - cortex * min(a, b)
        qi = (np.abs(u / ai) ** power + np.abs(v / bi) ** power) ** (1 / power)
        dep = min(a, b) if depth is None else depth
        if flat:
            outer = dep * np.clip((1 - q) * 12, 0, 1)
            inner = dep * 0.8 * np.clip((1 - qi) * 12, 0, 1)
        else:
            outer = 2 * dep * np.sqrt(np.maximum(1 - q * q, 0))
            inner = 2 * dep * (1 - cortex) * np.sqrt(np.maximum(1 - qi * qi, 0))
        self.bone[sl] += MU_CORTEX * np.maximum(outer - inner, 0) + MU_MEDULLA * inner
        self.soft[sl] += MU_SOFT * 0.3 * outer
        if host:
            self.hosts.append((c[0], c[1], min(a, b)))

    def hole(self, c, a, b, ang=0.0, strength=1.0):
        """Remove bone inside an ellipse (foramina)."""
        sl, uv = self._ell_q(c, a, b, ang)
        if sl is not None:
            u, v = uv
            q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            self.bone[sl] *= 1 - strength * np.clip((1 - q) * 6, 0, 1)

    def air(self, c, a, b, ang=0.0, mu=0.9):
        """Subtract soft tissue (lungs, bowel gas)."""
        sl, uv = self._ell_q(c, a, b, ang)
        if sl is not None:
            u, v = uv
            q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            self.soft[sl] -= mu * 2 * min(a, b) * np.sqrt(np.maximum(1 - q * q, 0))

    # -- lesion --------------------------------------------------------------------------------
    def add_lesion(self) -> tuple[float, float, float]:
        """Punch a lytic lesion with a sclerotic rim into one of the host bones."""
        rng = self.rng
        m = 0.11
        ok = [hh for hh in self.hosts if m < hh[0] < self.H - m and m < hh[1] < self.W - m]
        y, x, rb = (ok or self.hosts)[rng.integers(len(ok or self.hosts))]
        diam = float(np.clip(rng.uniform(1.0, 1.5) * rb, 0.065, 0.12))
        rl = diam / 2
        # offset a little from the bone's axis, keeping the lesion inside
        off = max(rb - rl, 0.0) * 0.5
        y += rng.uniform(-off, off)
        x += rng.uniform(-off, off)
        sl, d = self._seg_dist((y, x), (y, x), rl * 1.45)
        if sl is not None:
            b = self.bone[sl]
            local = float(np.percentile(b[b > 0], 75)) if (b > 0).any() else 1.0
            px = 1.0 / self.s
            core = np.clip((rl - d) / (1.5 * px), 0, 1)
            rim = np.clip(1 - np.abs(d - rl * 1.18) / (rl * 0.2 + px), 0, 1)
            self.bone[sl] = b * (1 - 0.85 * core) + (b > 0.05 * local) * rim * 0.5 * local
        return y, x, rl

    # -- output --------------------------------------------------------------------------------
    def render(self, gain: float) -> np.ndarray:
        """Display image: 1 - exp(-k A), k set so the densest 1 % of pixels reach ~0.9."""
        rng = self.rng
        tex = ndimage.gaussian_filter(rng.standard_normal((self.h, self.w)).astype(np.float32), 1.2)
        tex /= tex.std() + 1e-6
        bone = self.bone * (1 + 0.08 * tex)
        A = np.maximum(self.soft, 0) + bone
        k = gain * 2.3 / max(float(np.percentile(A, 99)), 1e-3)
        img = 1 - np.exp(-k * A)
        return img.astype(np.float32)


# --------------------------------------------------------------------------------------------
# body parts
# --------------------------------------------------------------------------------------------

def _j(rng, scale=0.02):
    return float(rng.normal(0, scale))


def _hand(c: Canvas, view: str):
    rng, W, H = c.rng, c.W, c.H
    cx = W / 2 + _j(rng)
    wrist_y = H * 0.70
    # forearm
    c.soft_capsule((H + 0.4, cx), (wrist_y - 0.08, cx), 0.22)
    c.soft_ellipse((wrist_y - 0.22, cx + 0.01), 0.21, 0.17, mu=MU_SOFT, depth=0.1)  # palm
    rx, ux = cx - 0.11, cx + 0.10
    c.bone_capsule((H + 0.2, rx), (wrist_y + 0.05, rx + 0.01), 0.06, host=True)
    c.bone_ellipse((wrist_y + 0.05, rx + 0.01), 0.085, 0.05, host=True)
    c.bone_capsule((H + 0.2, ux), (wrist_y + 0.06, ux - 0.01), 0.045)
    # carpals
    for (dy, dx, a, b) in ((0.0, -0.08, 0.05, 0.04), (0.0, 0.0, 0.045, 0.045), (0.0, 0.08, 0.045, 0.04),
                           (-0.08, -0.1, 0.045, 0.04), (-0.08, -0.03, 0.04, 0.045), (-0.08, 0.04, 0.05, 0.05),
                           (-0.08, 0.1, 0.04, 0.045)):
        c.bone_ellipse((wrist_y + dy - 0.02, cx + dx), a, b, ang=_j(rng, 0.2), cortex=0.3,
                       host=(a >= 0.05 and b >= 0.05))
    base_y = wrist_y - 0.13
    spread = 1.0 if view != "LAT" else 0.35
    fingers = [(-0.14, 0.32, 0.6), (-0.05, 0.40, 0.9), (0.03, 0.42, 1.0), (0.1, 0.39, 0.95), (0.16, 0.33, 0.8)]
    for k, (dx, length, lf) in enumerate(fingers):
        ang = (dx * 1.6 + _j(rng, 0.04)) * spread
        x0 = cx + dx * spread
        pts = [(base_y, x0)]
        seg = [0.30, 0.18, 0.12, 0.09] if k else [0.22, 0.15, 0.11]
        if k == 0:
            ang -= 0.5 * spread
            pts = [(base_y + 0.05, x0 - 0.04)]
        for L in seg:
            y, x = pts[-1]
            L *= lf * 0.95
            pts.append((y - L * math.cos(ang), x + L * math.sin(ang)))
            ang += _j(rng, 0.03)
        for i in range(len(pts) - 1):
            p0, p1 = pts[i], pts[i + 1]
            gap = 0.012
            y0 = p0[0] - gap if i else p0[0]
            c.soft_capsule(p0, p1, 0.045)
            r = (0.03 if i == 0 else 0.026 - 0.003 * i) * (0.9 + 0.1 * lf)
            c.bone_capsule((y0, p0[1]), (p1[0] + gap, p1[1]), r, cortex=0.35)


def _knee(c: Canvas, view: str):
    rng, W, H = c.rng, c.W, c.H
    cx = W / 2 + _j(rng)
    jy = H * 0.50 + _j(rng)
    c.soft_capsule((-0.6, cx + _j(rng)), (H + 0.6, cx + _j(rng)), 0.42 + _j(rng, 0.02))
    if view == "LAT":
        c.bone_capsule((-0.2, cx - 0.05), (jy - 0.14, cx + 0.0), 0.12, cortex=0.2, host=True)
        c.bone_ellipse((jy - 0.08, cx + 0.02), 0.15, 0.12, cortex=0.15, host=True)
        c.bone_ellipse((jy - 0.12, cx + 0.25), 0.05, 0.11, ang=0.3, cortex=0.3)  # patella
        c.bone_ellipse((jy + 0.09, cx + 0.0), 0.17, 0.06, cortex=0.2)
        c.bone_capsule((jy + 0.1, cx), (H + 0.2, cx - 0.04), 0.10, cortex=0.22, host=True)
        c.bone_capsule((jy + 0.12, cx - 0.12), (H + 0.2, cx - 0.15), 0.035, cortex=0.35)
        return
    c.bone_capsule((-0.2, cx + _j(rng)), (jy - 0.16, cx), 0.12, cortex=0.22, host=True)
    c.bone_ellipse((jy - 0.12, cx), 0.20, 0.09, cortex=0.15, host=True)
    c.bone_ellipse((jy - 0.06, cx - 0.10), 0.11, 0.075, cortex=0.2)
    c.bone_ellipse((jy - 0.06, cx + 0.10), 0.11, 0.075, cortex=0.2)
    c.bone_ellipse((jy - 0.10, cx + 0.02), 0.07, 0.085, cortex=0.3, depth=0.04)  # patella overlap
    c.bone_ellipse((jy + 0.08, cx), 0.22, 0.06, power=3, cortex=0.18)  # tibial plateau
    c.bone_capsule((jy + 0.1, cx), (H + 0.2, cx + _j(rng)), 0.10, cortex=0.22, host=True)
    c.bone_ellipse((jy + 0.15, cx + 0.2), 0.045, 0.04, cortex=0.3)  # fibular head
    c.bone_capsule((jy + 0.17, cx + 0.21), (H + 0.2, cx + 0.2), 0.03, cortex=0.35)


def _chest(c: Canvas, view: str):
    rng, W, H = c.rng, c.W, c.H
    cx = W / 2 + _j(rng)
    c.soft_ellipse((H * 0.55, cx), W * 0.48, H * 0.62, depth=0.45)
    c.soft_ellipse((-0.05, cx), 0.12, 0.2, depth=0.15)  # neck
    for side in (-1, 1):
        c.air((H * 0.5, cx + side * W * 0.2), W * 0.16, H * 0.33, ang=side * 0.08, mu=0.95)
    c.soft_ellipse((H * 0.62, cx - W * 0.05), W * 0.16, H * 0.15, depth=0.35)  # heart
    # spine
    for k in range(12):
        y = 0.06 * H + k * H * 0.075
        c.bone_ellipse((y, cx), 0.085, H * 0.034, power=3, cortex=0.25, depth=0.09, host=2 <= k <= 9)
    # ribs: arcs from spine outward and down
    for side in (-1, 1):
        for k in range(10):
            y0 = H * (0.16 + 0.068 * k)
            pts = []
            for t in np.linspace(0, 1, 7):
                x = cx + side * (0.04 + t * W * 0.36)
                y = y0 - 0.08 * math.sin(t * math.pi * 0.9) + t * t * H * 0.13
                pts.append((y, x))
            for p0, p1 in zip(pts[:-1], pts[1:]):
                c.bone_capsule(p0, p1, 0.018, cortex=0.4)
        # clavicle, humeral head, scapula
        c.bone_capsule((H * 0.14, cx + side * 0.05), (H * 0.10, cx + side * W * 0.38), 0.025, cortex=0.35)
        hx = cx + side * W * 0.38
        c.soft_ellipse((H * 0.22, hx), 0.14, 0.25, depth=0.15)
        c.bone_ellipse((H * 0.16, hx), 0.08, 0.08, cortex=0.15, host=True)
        c.bone_capsule((H * 0.2, hx + side * 0.01), (H * 0.6, hx + side * 0.03), 0.06, cortex=0.25, host=True)
        c.bone_ellipse((H * 0.3, cx + side * W * 0.34), W * 0.08, H * 0.17, ang=side * 0.3, flat=True,
                       depth=0.02, cortex=0.1)


def _foot(c: Canvas, view: str):
    W, H = c.W, c.H
    if view == "LAT":
        base = H * 0.72
        hx = 0.22 * W
        c.soft_capsule((-0.2, hx + 0.1), (base - 0.1, hx + 0.1), 0.17)
        c.soft_capsule((base - 0.05, hx - 0.05), (base - 0.02, W * 0.92), 0.17)
        c.bone_capsule((-0.2, hx + 0.1), (base - 0.35, hx + 0.1), 0.08, host=True)
        c.bone_capsule((-0.2, hx + 0.2), (base - 0.33, hx + 0.2), 0.03)
        c.bone_ellipse((base - 0.08, hx), 0.15, 0.09, ang=-0.25, cortex=0.15, host=True)  # calcaneus
        c.bone_ellipse((base - 0.24, hx + 0.14), 0.11, 0.08, cortex=0.18, host=True)  # talus
        c.bone_ellipse((base - 0.2, hx + 0.3), 0.06, 0.06, cortex=0.2)
        c.bone_ellipse((base - 0.08, hx + 0.26), 0.07, 0.06, cortex=0.2)
        for k in range(4):
            y0 = base - 0.18 + 0.025 * k
            c.bone_capsule((y0, hx + 0.38), (base - 0.04, W * 0.80 - 0.02 * k), 0.028, cortex=0.35)
        c.bone_capsule((base - 0.04, W * 0.80), (base - 0.03, W * 0.9), 0.024, cortex=0.35)
        return
    cx = W * 0.5
    c.soft_capsule((H * 0.2, cx - 0.15), (H * 0.85, cx + 0.05), 0.3)
    c.bone_ellipse((H * 0.22, cx - 0.15), 0.12, 0.10, cortex=0.15, host=True)
    c.bone_ellipse((H * 0.38, cx - 0.12), 0.07, 0.07, cortex=0.2)
    for k in range(5):
        y = H * (0.45 + 0.06 * k)
        c.bone_capsule((y, cx - 0.05), (y - 0.02 * k, cx + 0.35), 0.03, cortex=0.35)
        c.bone_capsule((y - 0.02 * k, cx + 0.39), (y - 0.03 * k, cx + 0.55), 0.024, cortex=0.35)
        c.soft_capsule((y - 0.02 * k, cx + 0.35), (y - 0.03 * k, cx + 0.6), 0.05)


def _pelvis(c: Canvas, view: str):
    rng, W, H = c.rng, c.W, c.H
    cx = W / 2 + _j(rng)
    c.soft_ellipse((H * 0.5, cx), W * 0.5, H * 0.65, depth=0.45)
    c.air((H * 0.25, cx + 0.15), 0.12, 0.06, mu=0.6)
    c.bone_ellipse((H * 0.08, cx), 0.12, 0.06, power=3, cortex=0.2, depth=0.05)  # L5
    c.bone_ellipse((H * 0.32, cx), 0.14, 0.18, cortex=0.15, flat=True, depth=0.06)  # sacrum
    for side in (-1, 1):
        c.bone_ellipse((H * 0.28, cx + side * 0.33), 0.22, 0.17, ang=side * -0.5, flat=True, depth=0.07,
                       cortex=0.12, host=True)  # iliac wing
        c.bone_ellipse((H * 0.72, cx + side * 0.12), 0.12, 0.1, flat=True, depth=0.05, cortex=0.2)
        c.hole((H * 0.73, cx + side * 0.13), 0.07, 0.055)
        fx, fy = cx + side * 0.38, H * 0.56
        c.bone_ellipse((fy, fx), 0.095, 0.095, cortex=0.15, host=True)  # femoral head
        c.bone_capsule((fy, fx), (fy + 0.12, fx + side * 0.14), 0.06, cortex=0.25)
        c.bone_ellipse((fy + 0.1, fx + side * 0.17), 0.07, 0.09, cortex=0.2)
        c.bone_capsule((fy + 0.14, fx + side * 0.14), (H + 0.2, fx + side * 0.12), 0.08, cortex=0.25, host=True)


def _spine(c: Canvas, view: str):
    rng, W, H = c.rng, c.W, c.H
    cx = W / 2 + _j(rng)
    c.soft_capsule((-0.3, cx), (H + 0.3, cx), W * 0.5, mu=0.8)
    n = 6
    step = H / n
    for k in range(n):
        y = step * (k + 0.5) + _j(rng, 0.01)
        x = cx + 0.05 * math.sin(k * 0.6 + _j(rng, 0.3))
        if view == "LAT":
            c.bone_ellipse((y, x - 0.05), 0.2, step * 0.36, power=4, cortex=0.12, host=True)
            c.bone_capsule((y, x + 0.15), (y + step * 0.2, x + 0.38), 0.04)
        else:
            c.bone_ellipse((y, x), 0.24, step * 0.36, power=4, cortex=0.12, host=True)
            for side in (-1, 1):
                c.bone_ellipse((y - step * 0.08, x + side * 0.14), 0.035, 0.05, cortex=0.4, depth=0.03)
                c.bone_capsule((y, x + side * 0.22), (y + 0.02, x + side * 0.42), 0.03)
            c.bone_ellipse((y + step * 0.25, x), 0.035, 0.06, cortex=0.4, depth=0.03)


def _shoulder(c: Canvas, view: str):
    W, H = c.W, c.H
    c.soft_ellipse((H * 0.55, W * 0.55), W * 0.6, H * 0.6, depth=0.45)
    c.air((H * 0.6, W * 0.05), 0.25, 0.4, mu=0.7)
    hy, hx = H * 0.38, W * 0.62
    c.bone_ellipse((hy, hx), 0.14, 0.14, cortex=0.12, host=True)
    c.bone_capsule((hy + 0.05, hx + 0.05), (H + 0.2, hx + 0.12), 0.1, cortex=0.22, host=True)
    c.bone_ellipse((hy + 0.05, hx - 0.24), 0.18, 0.32, ang=0.3, flat=True, depth=0.04, cortex=0.1)  # scapula
    c.bone_ellipse((hy, hx - 0.14), 0.04, 0.1, cortex=0.3)  # glenoid
    c.bone_capsule((hy - 0.2, -0.1), (hy - 0.16, hx + 0.05), 0.04, cortex=0.3)  # clavicle
    c.bone_capsule((hy - 0.16, hx - 0.1), (hy - 0.18, hx + 0.14), 0.045, cortex=0.3)  # acromion
    for k in range(5):
        y0 = H * (0.35 + 0.14 * k)
        c.bone_capsule((y0, -0.1), (y0 + 0.1, W * 0.3), 0.02, cortex=0.4)


_DRAW = {"hand": _hand, "knee": _knee, "chest": _chest, "foot": _foot, "pelvis": _pelvis,
         "spine": _spine, "shoulder": _shoulder}


def draw_radiograph(rng: np.random.Generator, body_part: str, view: str, lesion: bool,
                    long_side: int = 256) -> tuple[np.ndarray, dict]:
    """Draw one radiograph (display values, bone bright) on a small canvas.

    Returns ``(img, info)``; ``info`` has the lesion centre/radius in canvas pixels
    (``None`` without lesion) and the collimation box.
    """
    lo, hi = ASPECT[body_part]
    aspect = rng.uniform(lo, hi)  # h / w
    if aspect >= 1:
        h, w = long_side, max(16, int(round(long_side / aspect)))
    else:
        w, h = long_side, max(16, int(round(long_side * aspect)))
    c = Canvas(h, w, rng)
    _DRAW[body_part](c, view)
    lesion_info = None
    if lesion:
        y, x, r = c.add_lesion()
        lesion_info = (y * c.s - 0.5, x * c.s - 0.5, r * c.s)  # pixel index coordinates
    img = c.render(gain=rng.uniform(0.9, 1.3))
    # small rotation of the whole projection (patient positioning)
    ang = float(rng.uniform(-6, 6))
    m = max(h, w) // 8
    big = np.pad(img, m, mode="edge")
    big = np.asarray(Image.fromarray(big, mode="F").rotate(ang, resample=Image.BILINEAR))
    img = np.array(big[m:m + h, m:m + w])
    if lesion_info is not None:
        # PIL turns the picture counter-clockwise (as displayed) about the centre
        cy, cx = h / 2, w / 2
        t = math.radians(ang)
        dy, dx = lesion_info[0] + 0.5 - cy, lesion_info[1] + 0.5 - cx
        ny = cy - dx * math.sin(t) + dy * math.cos(t) - 0.5
        nx = cx + dx * math.cos(t) + dy * math.sin(t) - 0.5
        lesion_info = (ny, nx, lesion_info[2])
    # the other side of the body, and a random framing (crop that keeps the lesion)
    if rng.random() < 0.5:
        img = np.ascontiguousarray(img[:, ::-1])
        if lesion_info is not None:
            lesion_info = (lesion_info[0], w - 1 - lesion_info[1], lesion_info[2])
    t0, b0, l0, r0 = (int(n * f) for n, f in zip((h, h, w, w), rng.uniform(0, 0.1, 4)))
    if lesion_info is not None:
        ly, lx, lr = lesion_info
        t0 = min(t0, max(int(ly - 3 * lr), 0)); b0 = min(b0, max(int(h - ly - 3 * lr), 0))
        l0 = min(l0, max(int(lx - 3 * lr), 0)); r0 = min(r0, max(int(w - lx - 3 * lr), 0))
        lesion_info = (ly - t0, lx - l0, lr)
    img = np.ascontiguousarray(img[t0:h - b0, l0:w - r0])
    h, w = img.shape
    # heel effect / uneven exposure
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    img = img * (1 + rng.uniform(-0.06, 0.06) * yy) + rng.uniform(0.01, 0.05)
    # collimation: area outside the field was not exposed (bright, uniform)
    box = None
    if rng.random() < 0.7:
        t0, b0 = int(h * rng.uniform(0, 0.08)), int(h * rng.uniform(0, 0.08))
        l0, r0 = int(w * rng.uniform(0, 0.08)), int(w * rng.uniform(0, 0.08))
        if lesion_info is not None:  # never cut the lesion off
            ly, lx, lr = lesion_info
            t0 = min(t0, max(int(ly - 2 * lr), 0)); b0 = min(b0, max(int(h - ly - 2 * lr), 0))
            l0 = min(l0, max(int(lx - 2 * lr), 0)); r0 = min(r0, max(int(w - lx - 2 * lr), 0))
        mask = np.zeros((h, w), bool)
        mask[t0:h - b0, l0:w - r0] = True
        mask = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)
        level = rng.uniform(0.7, 0.9)
        img = img * mask + level * (1 - mask)
        box = (t0, b0, l0, r0)
    img = np.clip(img, 0, 1).astype(np.float32)
    return img, {"lesion": lesion_info, "collimation": box, "canvas": (h, w)}


# --------------------------------------------------------------------------------------------
# text markers
# --------------------------------------------------------------------------------------------

_GLYPHS = {
    "L": ["1000", "1000", "1000", "1000", "1000", "1000", "1111"],
    "R": ["1110", "1001", "1001", "1110", "1100", "1010", "1001"],
}


def burn_marker(img: np.ndarray, letter: str, rng: np.random.Generator, value: float = 1.0) -> None:
    """Burn a bright block letter ("L"/"R") into a corner of ``img`` in place."""
    h, w = img.shape
    g = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=bool)
    cell = max(2, int(min(h, w) * rng.uniform(0.008, 0.014)))
    glyph = np.kron(g, np.ones((cell, cell), bool))
    gh, gw = glyph.shape
    m = int(min(h, w) * 0.06)
    top = rng.random() < 0.5
    left = rng.random() < 0.5
    y0 = m if top else h - m - gh
    x0 = m if left else w - m - gw
    img[y0:y0 + gh, x0:x0 + gw][glyph] = value


# --------------------------------------------------------------------------------------------
# CT and MR slices
# --------------------------------------------------------------------------------------------

def _disk(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def cross_section(rng: np.random.Generator, n: int, lesion: bool, z: float, lesion_pos=None) -> dict:
    """Tissue masks for an axial slice through a thigh (femur), on an n x n grid.

    ``z`` in [-1, 1] moves through the lesion (its radius shrinks at the ends).
    Returns boolean masks: body, fat, muscle, cortex, marrow, lesion, rim, table.
    """
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    body = _disk(yy, xx, 0.5, 0.5, 0.36, 0.33)
    muscle = _disk(yy, xx, 0.5, 0.5, 0.31, 0.28)
    by, bx = 0.48, 0.52
    cortex = _disk(yy, xx, by, bx, 0.085, 0.08)
    marrow = _disk(yy, xx, by, bx, 0.055, 0.05)
    lesion_m = np.zeros_like(body)
    rim = np.zeros_like(body)
    if lesion and lesion_pos is not None:
        ang, rl = lesion_pos
        r = rl * math.sqrt(max(1 - 0.6 * z * z, 0.2))
        ly, lx = by + 0.065 * math.sin(ang), bx + 0.065 * math.cos(ang)
        d = np.hypot(yy - ly, xx - lx)
        lesion_m = d <= r
        rim = (d > r) & (d <= r + 0.012) & cortex
    table = (yy > 0.9) & (yy < 0.93) & (np.abs(xx - 0.5) < 0.45)
    return {"body": body, "fat": body & ~muscle, "muscle": muscle & ~cortex, "cortex": cortex & ~marrow,
            "marrow": marrow, "lesion": lesion_m, "rim": rim, "table": table}


def draw_ct_hu(rng: np.random.Generator, masks: dict) -> np.ndarray:
    """Hounsfield units of one CT slice (float32) from :func:`cross_section` masks."""
    hu = np.full(masks["body"].shape, -1000.0, np.float32)
    hu[masks["table"]] = 250
    hu[masks["fat"]] = -100
    hu[masks["muscle"]] = 45
    hu[masks["cortex"]] = 1400
    hu[masks["marrow"]] = 60
    hu[masks["rim"]] = 900
    hu[masks["lesion"]] = 25
    return ndimage.gaussian_filter(hu, 0.6)


def draw_mr(rng: np.random.Generator, masks: dict) -> np.ndarray:
    """T1-like MR signal (arbitrary units, 0..~1400) from :func:`cross_section` masks."""
    s = np.zeros(masks["body"].shape, np.float32)
    s[masks["fat"]] = 1250
    s[masks["muscle"]] = 420
    s[masks["cortex"]] = 40
    s[masks["marrow"]] = 1150
    s[masks["rim"]] = 30
    s[masks["lesion"]] = 260
    yy = np.linspace(0, 1, s.shape[0], dtype=np.float32)[:, None]
    s *= 1.1 - 0.25 * yy  # coil sensitivity falls off
    return ndimage.gaussian_filter(s, 0.8)
