"""Toy-world scenes: a seeded generator and an exact, vectorised numpy ray caster.

A scene is a room (a ground plane and a back wall) seen by a pinhole camera that looks slightly
down, with simple shapes (cube, sphere, cylinder, cone, pyramid) in several colours and sizes and
stick-figure people whose 17 joints follow the COCO keypoint order. Rendering casts one ray per
pixel and gives, exactly and consistently:

* ``image``: uint8 (H, W, 3), Lambert shading with an ambient term and cast shadows;
* ``depth``: float32 (H, W), z-depth in metres along the optical axis (the wall bounds it);
* ``normals``: float32 (H, W, 3), unit surface normals in the camera frame
  (x right, y up, z towards the camera);
* ``instance``: int16 (H, W), the object index hit by each pixel (-1 floor, -2 wall);
* per object: visible mask, tight pixel box ``[x1, y1, x2, y2]`` (pixel (i, j) covers
  ``[j, j+1] x [i, i+1]``) and, for people, keypoints ``[x, y, v]`` with COCO visibility
  (2 visible, 1 occluded, 0 outside the image).

World frame: x right, y up, z towards the camera's start position (objects stand at negative z).
Ray directions are scaled so that a ray parameter ``t`` *is* the z-depth of the hit point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# ---- vocabulary of the world -------------------------------------------------------------------
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.13, 0.11),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.86, 0.16),
    "green": (0.16, 0.66, 0.22),
    "cyan": (0.10, 0.76, 0.80),
    "blue": (0.13, 0.26, 0.86),
    "purple": (0.52, 0.22, 0.72),
    "pink": (0.96, 0.52, 0.72),
}
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "pyramid")
PERSON = "person"
CATEGORIES: tuple[str, ...] = SHAPES + (PERSON,)
# size name -> footprint width in metres (a cube's edge, a sphere's diameter)
SIZES: dict[str, float] = {"small": 0.36, "medium": 0.56, "large": 0.80}
FLOORS: dict[str, tuple[float, float, float]] = {
    "gray": (0.55, 0.55, 0.55), "beige": (0.78, 0.70, 0.55), "brown": (0.50, 0.36, 0.24),
    "dark gray": (0.32, 0.32, 0.34)}
WALLS: dict[str, tuple[float, float, float]] = {
    "white": (0.90, 0.90, 0.88), "cream": (0.92, 0.87, 0.72), "light gray": (0.74, 0.75, 0.77)}
PANTS: dict[str, tuple[float, float, float]] = {
    "black": (0.12, 0.12, 0.14), "navy": (0.12, 0.16, 0.36), "gray": (0.42, 0.42, 0.44)}
SKIN: tuple[tuple[float, float, float], ...] = ((0.96, 0.80, 0.66), (0.80, 0.60, 0.45), (0.55, 0.38, 0.26))
POSES: tuple[str, ...] = ("standing", "walking", "waving", "arms out")

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle")
# COCO's skeleton as 0-based joint index pairs (for drawing)
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))

FLOOR_ID, WALL_ID = -1, -2
_EPS = 1e-6


# ---- geometry primitives (each returns t (N,) with inf for a miss, and unit normals (N, 3)) -----
def _hit_sphere(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    oc = o - c  # (N, 3)
    a = np.einsum("ij,ij->i", d, d)
    b = np.einsum("ij,ij->i", oc, d)
    cc = np.einsum("ij,ij->i", oc, oc) - r * r
    disc = b * b - a * cc
    ok = disc >= 0
    t = np.full(len(d), np.inf)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t0 = (-b - sq) / a
    t1 = (-b + sq) / a
    t = np.where(ok & (t0 > _EPS), t0, np.where(ok & (t1 > _EPS) & (cc < 0), t1, np.inf))
    n = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - c) / r
    return t, n


def _hit_convex(o, d, normals: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray vs the convex polyhedron ``{x : normals @ x <= offsets}`` (K planes). Rays start outside."""
    denom = d @ normals.T  # (N, K)
    num = offsets[None, :] - o @ normals.T  # (N, K): > 0 when the origin is inside plane k
    with np.errstate(divide="ignore", invalid="ignore"):
        tk = num / denom
    entering = denom < -1e-12
    exiting = denom > 1e-12
    parallel_out = (~entering & ~exiting) & (num < 0)
    t_in_k = np.where(entering, tk, -np.inf)
    k_in = np.argmax(t_in_k, axis=1)
    t_in = t_in_k[np.arange(len(d)), k_in]
    t_out = np.where(exiting, tk, np.inf).min(axis=1)
    hit = (t_in <= t_out) & (t_in > _EPS) & ~parallel_out.any(axis=1)
    return np.where(hit, t_in, np.inf), normals[k_in]


def _hit_vertical_cylinder(o, d, cx: float, cz: float, radius: float, y0: float, y1: float):
    """Ray vs a solid vertical cylinder (convex: infinite cylinder interval ∩ slab interval)."""
    n_rays = len(d)
    ox, oz = o[:, 0] - cx, o[:, 2] - cz
    dx, dz = d[:, 0], d[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - radius * radius
    disc = b * b - a * c
    ok = (disc >= 0) & (a > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        c0 = np.where(ok, (-b - sq) / a, np.inf)
        c1 = np.where(ok, (-b + sq) / a, -np.inf)
        ty0 = (y0 - o[:, 1]) / d[:, 1]
        ty1 = (y1 - o[:, 1]) / d[:, 1]
    s0, s1 = np.minimum(ty0, ty1), np.maximum(ty0, ty1)
    vertical = np.abs(d[:, 1]) < 1e-12
    inside_slab = (o[:, 1] >= y0) & (o[:, 1] <= y1)
    s0 = np.where(vertical, np.where(inside_slab, -np.inf, np.inf), s0)
    s1 = np.where(vertical, np.where(inside_slab, np.inf, -np.inf), s1)
    t_in = np.maximum(c0, s0)
    t_out = np.minimum(c1, s1)
    hit = (t_in <= t_out) & (t_in > _EPS)
    t = np.where(hit, t_in, np.inf)
    side = c0 >= s0
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    n = np.zeros((n_rays, 3))
    n[:, 0] = np.where(side, (p[:, 0] - cx) / radius, 0.0)
    n[:, 2] = np.where(side, (p[:, 2] - cz) / radius, 0.0)
    n[:, 1] = np.where(side, 0.0, np.where(d[:, 1] < 0, 1.0, -1.0))
    return t, n


def _hit_capsule(o, d, a_pt: np.ndarray, b_pt: np.ndarray, r: float):
    """Ray vs a capsule (segment a-b swept by radius r). Convex, so the first hit is the earliest
    entry among the two end spheres and the finite side cylinder."""
    ta, na = _hit_sphere(o, d, a_pt, r)
    tb, nb = _hit_sphere(o, d, b_pt, r)
    axis = b_pt - a_pt
    length = float(np.linalg.norm(axis))
    u = axis / max(length, 1e-9)
    oa = o - a_pt
    d_perp = d - np.outer(d @ u, u)
    o_perp = oa - np.outer(oa @ u, u)
    qa = np.einsum("ij,ij->i", d_perp, d_perp)
    qb = np.einsum("ij,ij->i", o_perp, d_perp)
    qc = np.einsum("ij,ij->i", o_perp, o_perp) - r * r
    disc = qb * qb - qa * qc
    ok = (disc >= 0) & (qa > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = np.where(ok, (-qb - np.sqrt(np.where(ok, disc, 0.0))) / qa, np.inf)
    s = (oa + np.where(np.isfinite(tc), tc, 0.0)[:, None] * d) @ u
    tc = np.where((tc > _EPS) & (s >= 0) & (s <= length), tc, np.inf)
    p = o + np.where(np.isfinite(tc), tc, 0.0)[:, None] * d
    nc = p - a_pt - np.outer(np.clip(s, 0, length), u)
    nc /= np.maximum(np.linalg.norm(nc, axis=1, keepdims=True), 1e-12)
    t = np.minimum(np.minimum(ta, tb), tc)
    n = np.where((t == ta)[:, None], na, np.where((t == tb)[:, None], nb, nc))
    return t, n


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _rot_y(yaw: float) -> np.ndarray:
    """Rotation about the vertical axis (counter-clockwise seen from above)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


# ---- primitives as small records ---------------------------------------------------------------
@dataclass
class Primitive:
    """One solid piece of an object: ``kind`` in sphere | convex | cylinder | capsule | cone."""

    kind: str
    params: dict
    color: tuple[float, float, float]
    bound: tuple[np.ndarray, float] | None = None  # bounding sphere, for culling inside an object

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        if self.kind == "sphere":
            return _hit_sphere(o, d, p["center"], p["radius"])
        if self.kind == "convex":
            return _hit_convex(o, d, p["normals"], p["offsets"])
        if self.kind == "cone":  # a 32-sided pyramid for the silhouette, the true cone's normals for shading
            t, n = _hit_convex(o, d, p["normals"], p["offsets"])
            pt = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
            rx, rz = pt[:, 0] - p["cx"], pt[:, 2] - p["cz"]
            rho = np.maximum(np.hypot(rx, rz), 1e-9)
            smooth = _normalize(np.stack([rx / rho, np.full_like(rx, p["radius"] / p["height"]), rz / rho], 1))
            base = n[:, 1] < -0.5  # the bottom face keeps its flat normal
            return t, np.where(base[:, None], n, smooth)
        if self.kind == "cylinder":
            return _hit_vertical_cylinder(o, d, p["cx"], p["cz"], p["radius"], p["y0"], p["y1"])
        if self.kind == "capsule":
            return _hit_capsule(o, d, p["a"], p["b"], p["radius"])
        raise ValueError(f"unknown primitive kind {self.kind!r}")


@dataclass
class SceneObject:
    """A shape or a person standing on the floor."""

    category: str  # one of CATEGORIES
    color: str  # shapes: body colour; people: shirt colour
    size: str  # a SIZES key for shapes; people are "large"
    x: float
    z: float
    yaw: float
    height: float
    radius: float  # footprint radius (for placement and the bounding sphere)
    primitives: list[Primitive] = field(default_factory=list)
    pose: str | None = None  # people only
    joints: np.ndarray | None = None  # people only: (17, 3) world coordinates
    bound_center: np.ndarray | None = None
    bound_radius: float = 0.0

    @property
    def name(self) -> str:
        """"red cube" for shapes, "person" for people."""
        return PERSON if self.category == PERSON else f"{self.color} {self.category}"


def _shape_object(category: str, color: str, size: str, x: float, z: float, yaw: float) -> SceneObject:
    w = SIZES[size]
    rgb = COLORS[color]
    rot = _rot_y(yaw)
    prims: list[Primitive] = []
    if category == "cube":
        h = w
        face_n = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
        centre = np.array([x, h / 2, z])
        normals = face_n @ rot.T
        offsets = normals @ centre + np.array([w, w, h, h, w, w]) / 2
        prims.append(Primitive("convex", {"normals": normals, "offsets": offsets}, rgb))
        radius = w / 2 * math.sqrt(2)
    elif category == "pyramid":
        h = w * 0.9
        half = w / 2
        slope = math.atan2(h, half)  # the angle of each side face with the floor
        side = [np.array([math.sin(slope) * sx, math.cos(slope), math.sin(slope) * sz])
                for sx, sz in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        apex = np.array([x, h, z])
        normals = np.stack([rot @ n for n in side] + [np.array([0.0, -1.0, 0.0])])
        offsets = np.concatenate([normals[:4] @ apex, [0.0]])
        prims.append(Primitive("convex", {"normals": normals, "offsets": offsets}, rgb))
        radius = half * math.sqrt(2)
    elif category == "sphere":
        h = w
        prims.append(Primitive("sphere", {"center": np.array([x, w / 2, z]), "radius": w / 2}, rgb))
        radius = w / 2
    elif category == "cylinder":
        h = w * 1.1
        prims.append(Primitive("cylinder", {"cx": x, "cz": z, "radius": w / 2, "y0": 0.0, "y1": h}, rgb))
        radius = w / 2
    elif category == "cone":
        h = w * 1.25
        r = w / 2
        k = 32
        ang = (np.arange(k) + 0.5) * 2 * math.pi / k
        slope = math.atan2(h, r)
        sides = np.stack([np.sin(slope) * np.cos(ang), np.full(k, np.cos(slope)), np.sin(slope) * np.sin(ang)], 1)
        apex = np.array([x, h, z])
        normals = np.concatenate([sides, [[0.0, -1.0, 0.0]]])
        offsets = np.concatenate([sides @ apex, [0.0]])
        prims.append(Primitive("cone", {"normals": normals, "offsets": offsets, "cx": x, "cz": z,
                                        "radius": r, "height": h}, rgb))
        radius = r
    else:
        raise ValueError(f"unknown shape {category!r}; expected one of {SHAPES}")
    obj = SceneObject(category, color, size, x, z, yaw, h, radius, prims)
    obj.bound_center = np.array([x, h / 2, z])
    obj.bound_radius = math.hypot(radius, h / 2) * 1.05
    return obj


# ---- people ------------------------------------------------------------------------------------
# Person-local frame: +x the person's left, +y up, +z the direction the person faces. Height 1.75 m.
_HEAD_R = 0.115


def _limb(direction_deg_flex: float, abduct_deg: float, side: float) -> np.ndarray:
    """A unit limb direction: straight down, swung forward by ``flex`` and outwards by ``abduct``."""
    f, a = math.radians(direction_deg_flex), math.radians(abduct_deg)
    v = np.array([side * math.sin(a), -math.cos(a), 0.0])
    # flexion: rotate about the local x axis (positive swings the limb forward, towards +z)
    return np.array([v[0], v[1] * math.cos(f), -v[1] * math.sin(f)])


def _person_joints(pose: str, rng: np.random.Generator) -> np.ndarray:
    """18 points in the person-local frame for a 1.75 m person: the 17 COCO joints, then the head centre."""
    j = np.zeros((18, 3))
    shoulder_y, hip_y = 1.43, 0.93
    for side, (s_i, e_i, w_i, h_i, k_i, a_i) in ((1.0, (5, 7, 9, 11, 13, 15)), (-1.0, (6, 8, 10, 12, 14, 16))):
        j[s_i] = (side * 0.19, shoulder_y, 0.0)
        j[h_i] = (side * 0.10, hip_y, 0.0)
        raise_forearm = False
        if pose == "standing":
            flex, abd, bend = rng.uniform(-8, 8), rng.uniform(5, 14), rng.uniform(0, 25)
            leg_flex, knee = rng.uniform(-4, 4), 0.0
        elif pose == "walking":
            swing = rng.uniform(18, 30)
            flex, abd, bend = side * swing, 6.0, rng.uniform(10, 30)
            leg_flex, knee = -side * swing * 0.9, rng.uniform(5, 20)
        elif pose == "waving":
            if side > 0:  # the left arm is raised, the forearm points up
                flex, abd, bend, raise_forearm = rng.uniform(-10, 10), rng.uniform(100, 130), rng.uniform(30, 60), True
            else:
                flex, abd, bend = rng.uniform(-5, 5), rng.uniform(5, 12), rng.uniform(0, 15)
            leg_flex, knee = rng.uniform(-3, 3), 0.0
        elif pose == "arms out":
            flex, abd, bend = rng.uniform(-10, 10), rng.uniform(80, 100), rng.uniform(0, 10)
            leg_flex, knee = rng.uniform(-3, 3), 0.0
        else:
            raise ValueError(f"unknown pose {pose!r}; expected one of {POSES}")
        j[e_i] = j[s_i] + 0.30 * _limb(flex, abd, side)
        fore = _limb(flex, min(abd + bend, 178.0), side) if raise_forearm else _limb(flex + bend, abd, side)
        j[w_i] = j[e_i] + 0.26 * fore
        j[k_i] = j[h_i] + 0.43 * _limb(leg_flex, 2.0, side)
        j[a_i] = j[k_i] + 0.42 * _limb(leg_flex - knee, 1.0, side)
    head = np.array([0.0, 1.64, 0.0])
    j[17] = head
    j[0] = head + _HEAD_R * _normalize(np.array([0.0, -0.12, 0.99])) * 0.97  # nose
    for side, eye, ear in ((1.0, 1, 3), (-1.0, 2, 4)):
        j[eye] = head + _HEAD_R * _normalize(np.array([side * 0.33, 0.25, 0.91])) * 0.97
        j[ear] = head + _HEAD_R * np.array([side * 0.97, 0.05, -0.05])
    return j


def _person_object(shirt: str, pants: str, skin: tuple, pose: str, x: float, z: float, yaw: float,
                   scale: float, rng: np.random.Generator) -> SceneObject:
    local = _person_joints(pose, rng)
    local[:, 1] -= local[[15, 16], 1].min() - 0.07  # feet on the floor
    local *= scale
    points = local @ _rot_y(yaw).T + np.array([x, 0.0, z])
    joints, head_c = points[:17], points[17]
    shirt_rgb, pants_rgb = COLORS[shirt], PANTS[pants]
    s, head_r = scale, _HEAD_R * scale
    up = np.array([0.0, 1.0, 0.0])
    mid_sh = (joints[5] + joints[6]) / 2
    mid_hip = (joints[11] + joints[12]) / 2
    caps = [  # (a, b, radius, colour)
        (mid_sh - 0.04 * s * up, mid_hip + 0.06 * s * up, 0.135 * s, shirt_rgb),  # torso
        (joints[5], joints[6], 0.06 * s, shirt_rgb),  # shoulders
        (joints[11], joints[12], 0.085 * s, pants_rgb),  # pelvis
        (mid_sh, head_c - 0.8 * head_r * up, 0.045 * s, skin),  # neck
        (joints[5], joints[7], 0.05 * s, shirt_rgb), (joints[6], joints[8], 0.05 * s, shirt_rgb),
        (joints[7], joints[9], 0.04 * s, skin), (joints[8], joints[10], 0.04 * s, skin),
        (joints[11], joints[13], 0.065 * s, pants_rgb), (joints[12], joints[14], 0.065 * s, pants_rgb),
        (joints[13], joints[15], 0.05 * s, pants_rgb), (joints[14], joints[16], 0.05 * s, pants_rgb),
    ]
    prims = [Primitive("capsule", {"a": a, "b": b, "radius": r}, c,
                       bound=((a + b) / 2, float(np.linalg.norm(b - a)) / 2 + r)) for a, b, r, c in caps]
    prims.append(Primitive("sphere", {"center": head_c, "radius": head_r}, skin, bound=(head_c, head_r)))
    lo = np.minimum(joints.min(0), head_c - head_r) - 0.15 * s
    hi = np.maximum(joints.max(0), head_c + head_r) + 0.15 * s
    foot = float(np.hypot(*(joints[:, [0, 2]] - [x, z]).T).max() + 0.08 * s)
    top = max([float(head_c[1] + head_r)] + [max(a[1], b[1]) + r for a, b, r, _ in caps])  # a raised hand counts
    obj = SceneObject(PERSON, shirt, "large", x, z, yaw, top, max(0.3 * s, foot), prims,
                      pose=pose, joints=joints)
    obj.bound_center = (lo + hi) / 2
    obj.bound_radius = float(np.linalg.norm(hi - lo) / 2)
    return obj


# ---- camera ------------------------------------------------------------------------------------
@dataclass
class Camera:
    """Pinhole camera at ``(0, height, 0)`` looking along -z, pitched down by ``pitch`` radians."""

    height: float
    pitch: float
    fov_y: float  # vertical field of view, radians
    image_hw: tuple[int, int]

    @property
    def origin(self) -> np.ndarray:
        return np.array([0.0, self.height, 0.0])

    @property
    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, back) as world vectors; back = the camera frame's +z (towards the viewer)."""
        c, s = math.cos(self.pitch), math.sin(self.pitch)
        return np.array([1.0, 0, 0]), np.array([0, c, -s]), np.array([0, s, c])

    @property
    def tan_half(self) -> tuple[float, float]:
        h, w = self.image_hw
        ty = math.tan(self.fov_y / 2)
        return ty * w / h, ty

    def rays(self) -> np.ndarray:
        """(H*W, 3) world directions, row-major, scaled so that t equals the z-depth."""
        h, w = self.image_hw
        tx, ty = self.tan_half
        right, up, back = self.basis
        xs = ((np.arange(w) + 0.5) / w * 2 - 1) * tx
        ys = (1 - (np.arange(h) + 0.5) / h * 2) * ty
        gx, gy = np.meshgrid(xs, ys)
        return -back[None] + gx.reshape(-1, 1) * right[None] + gy.reshape(-1, 1) * up[None]

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World (N, 3) -> camera frame (N, 3), x right, y up, z towards the viewer."""
        right, up, back = self.basis
        rel = np.asarray(points, float) - self.origin
        return np.stack([rel @ right, rel @ up, rel @ back], axis=-1)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World (N, 3) -> pixel (N, 2) ``x, y`` (continuous, pixel centres at +0.5) and z-depth (N,)."""
        h, w = self.image_hw
        tx, ty = self.tan_half
        pc = self.to_camera(points)
        depth = -pc[:, 2]
        safe = np.where(depth > 1e-9, depth, 1e-9)
        x = (pc[:, 0] / safe / tx + 1) / 2 * w
        y = (1 - pc[:, 1] / safe / ty) / 2 * h
        return np.stack([x, y], axis=1), depth


class _ScreenCull:
    """Culling for the camera's pixel rays: a sphere can only be hit by the pixels inside the
    projection of its bounding cube (all pixels when the cube reaches behind the camera)."""

    _SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)

    def __init__(self, camera: "Camera"):
        self.camera = camera
        self.h, self.w = camera.image_hw

    def select(self, center: np.ndarray, radius: float, idx: np.ndarray | None = None) -> np.ndarray:
        xy, z = self.camera.project(center + radius * self._SIGNS)
        if (z <= 0.05).any():
            return np.arange(self.h * self.w) if idx is None else idx
        c0, c1 = max(int(np.floor(xy[:, 0].min())), 0), min(int(np.ceil(xy[:, 0].max())), self.w)
        r0, r1 = max(int(np.floor(xy[:, 1].min())), 0), min(int(np.ceil(xy[:, 1].max())), self.h)
        if c0 >= c1 or r0 >= r1:
            return np.zeros(0, dtype=np.int64)
        if idx is None:
            return (np.arange(r0, r1)[:, None] * self.w + np.arange(c0, c1)[None, :]).reshape(-1)
        r, c = idx // self.w, idx % self.w
        return idx[(r >= r0) & (r < r1) & (c >= c0) & (c < c1)]


class _LightCull:
    """Culling for shadow rays from ``points`` towards the light: a sphere can only be hit by the
    rays whose origin projects into its disc on the plane perpendicular to the light."""

    def __init__(self, points: np.ndarray, light: np.ndarray):
        e1 = _normalize(np.cross(light, [0.0, 0.0, 1.0]))
        self.basis = np.stack([e1, np.cross(light, e1)], 1)  # (3, 2)
        self.light = light
        self.p2 = points @ self.basis  # (N, 2)
        self.along = points @ light  # (N,)

    def select(self, center: np.ndarray, radius: float, idx: np.ndarray | None = None) -> np.ndarray:
        c2 = center @ self.basis
        ahead = center @ self.light + radius
        if idx is None:
            keep = (((self.p2 - c2) ** 2).sum(1) <= radius * radius) & (self.along < ahead)
            return np.nonzero(keep)[0]
        keep = (((self.p2[idx] - c2) ** 2).sum(1) <= radius * radius) & (self.along[idx] < ahead)
        return idx[keep]


# ---- the scene ---------------------------------------------------------------------------------
@dataclass
class Scene:
    """A sampled scene; :meth:`render` fills the image, depth, normals and per-object annotations."""

    camera: Camera
    floor: str
    wall: str
    wall_distance: float
    light: np.ndarray  # unit vector towards the light
    objects: list[SceneObject]
    image: np.ndarray | None = None
    depth: np.ndarray | None = None
    normals: np.ndarray | None = None
    instance: np.ndarray | None = None
    boxes: list[list[float]] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)
    keypoints: list[np.ndarray | None] = field(default_factory=list)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.camera.image_hw

    def mask(self, index: int) -> np.ndarray:
        """Visible mask of object ``index``: bool (H, W)."""
        return self.instance == index

    def cam_position(self, index: int) -> np.ndarray:
        """Camera-frame (x right, y up, z towards the viewer) position of the object's base centre."""
        o = self.objects[index]
        return self.camera.to_camera(np.array([[o.x, 0.0, o.z]]))[0]

    # ---- ray casting ---------------------------------------------------------------------------
    def _cast(self, o: np.ndarray, d: np.ndarray, cull: "_ScreenCull | _LightCull"):
        """Nearest object hit for rays (o (N,3), d (N,3)): t, object index (-3 = none), normal, colour.
        ``cull`` picks the rays that may hit a bounding sphere (objects, then their primitives)."""
        n = len(d)
        t_best = np.full(n, np.inf)
        idx = np.full(n, -3, dtype=np.int16)
        nrm = np.zeros((n, 3))
        col = np.zeros((n, 3))
        for k, obj in enumerate(self.objects):
            cand = cull.select(obj.bound_center, obj.bound_radius)
            for prim in obj.primitives:
                pc = cand if prim.bound is None else cull.select(prim.bound[0], prim.bound[1], cand)
                if len(pc) == 0:
                    continue
                t, pn = prim.hit(o[pc], d[pc])
                closer = t < t_best[pc]
                if not closer.any():
                    continue
                sel = pc[closer]
                t_best[sel] = t[closer]
                idx[sel] = k
                nrm[sel] = pn[closer]
                col[sel] = prim.color
        return t_best, idx, nrm, col

    def _room(self, cam: "Camera", d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance to the room (floor y = 0 or back wall z = -wall_distance) and the floor flag."""
        with np.errstate(divide="ignore"):
            t_floor = np.where(d[:, 1] < -1e-12, -cam.height / d[:, 1], np.inf)
            t_wall = np.where(d[:, 2] < -1e-12, -self.wall_distance / d[:, 2], np.inf)
        on_floor = t_floor < t_wall
        t_room = np.where(on_floor, t_floor, t_wall)
        if not np.all(np.isfinite(t_room)):
            raise ValueError("the camera sees past the room; lower the pitch or field of view")
        return t_room, on_floor

    def render(self) -> "Scene":
        """Cast the primary and shadow rays; fill the image, depth, normals, masks, boxes, keypoints."""
        cam = self.camera
        h, w = cam.image_hw
        d = cam.rays()  # (N, 3)
        o = np.broadcast_to(cam.origin, d.shape).copy()
        t_room, on_floor = self._room(cam, d)
        t_obj, idx, nrm, col = self._cast(o, d, _ScreenCull(cam))
        hit_obj = t_obj < t_room
        t = np.where(hit_obj, t_obj, t_room)
        ids = np.where(hit_obj, idx, np.where(on_floor, FLOOR_ID, WALL_ID)).astype(np.int16)
        p = o + t[:, None] * d
        room_n = np.where(on_floor[:, None], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]])
        normal = np.where(hit_obj[:, None], nrm, room_n)
        # never shade a face from behind (numerical safety for grazing rays)
        flip = np.einsum("ij,ij->i", normal, d) > 0
        normal = np.where(flip[:, None], -normal, normal)
        albedo = np.where(hit_obj[:, None], col, np.where(on_floor[:, None], [FLOORS[self.floor]], [WALLS[self.wall]]))
        # floor tiles (0.5 m) give texture and a perspective cue
        tiles = ((np.floor(p[:, 0] / 0.5) + np.floor(p[:, 2] / 0.5)) % 2) * 0.06 - 0.03
        albedo = albedo * np.where((ids == FLOOR_ID)[:, None], 1.0 + tiles[:, None], 1.0)
        # shadows: one ray towards the directional light per pixel
        lam = np.clip(normal @ self.light, 0.0, 1.0)
        lit_cand = np.nonzero(lam > 0)[0]
        shadow = np.zeros(len(d), dtype=bool)
        if len(lit_cand):
            so = p[lit_cand] + normal[lit_cand] * 1e-4
            sd = np.broadcast_to(self.light, so.shape).copy()
            ts, _, _, _ = self._cast(so, sd, _LightCull(so, self.light))
            shadow[lit_cand] = np.isfinite(ts)
        shade = 0.38 + 0.62 * lam * ~shadow
        rgb = np.clip(albedo * shade[:, None], 0.0, 1.0) ** (1 / 1.1)
        self.image = (rgb.reshape(h, w, 3) * 255 + 0.5).astype(np.uint8)
        self.depth = t.reshape(h, w).astype(np.float32)
        right, up, back = cam.basis
        self.normals = np.stack([normal @ right, normal @ up, normal @ back], axis=-1).reshape(h, w, 3)
        self.normals = _normalize(self.normals).astype(np.float32)
        self.instance = ids.reshape(h, w)
        self._annotate()
        return self

    def _annotate(self) -> None:
        self.boxes, self.areas, self.keypoints = [], [], []
        for k, obj in enumerate(self.objects):
            m = self.instance == k
            area = int(m.sum())
            self.areas.append(area)
            if area:
                rows = np.nonzero(m.any(1))[0]
                cols = np.nonzero(m.any(0))[0]
                self.boxes.append([float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)])
            else:
                self.boxes.append([0.0, 0.0, 0.0, 0.0])
            self.keypoints.append(self._keypoints(k) if obj.category == PERSON else None)

    def _keypoints(self, k: int) -> np.ndarray:
        """(17, 3) ``[x, y, v]``: v=2 when the joint's pixel shows this person within a limb radius
        of the joint, v=1 when inside the image but hidden, v=0 (and x=y=0) when outside."""
        h, w = self.image_hw
        xy, z = self.camera.project(self.objects[k].joints)
        out = np.zeros((17, 3), dtype=np.float64)
        inside = (z > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        for j in range(17):
            if not inside[j]:
                continue
            col, row = int(xy[j, 0]), int(xy[j, 1])
            seen = self.instance[row, col] == k and self.depth[row, col] > z[j] - 0.12
            out[j] = (xy[j, 0], xy[j, 1], 2 if seen else 1)
        return out


# ---- sampling ----------------------------------------------------------------------------------
@dataclass
class SceneConfig:
    """Ranges the scene sampler draws from."""

    # The camera frames the objects so that they span the units that read and write them: at 128 px
    # the median object is ~30 px wide (two 16-px patches; two codes of an 8x8 VQ-GAN grid). With the
    # first version's wide view (55 deg, objects 2.6-7.2 m away, 3-6 of them) the median object was
    # 16 px, one patch and one code: object masks could not be written (the toy VQ-GAN's segmentation
    # ceiling was a mask IoU of 0.46) and a localisation-only probe barely read the image.
    image_size: tuple[int, int] = (128, 128)
    min_objects: int = 2
    max_objects: int = 5
    max_people: int = 2
    person_prob: float = 0.55  # chance that a scene has at least one person
    fov_y_deg: float = 32.0
    near: float = 2.4  # nearest object distance (m, along the view)
    far: float = 5.5
    min_visible_frac: float = 0.003  # objects showing fewer pixels than this are removed

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(v) for v in self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size must be (H, W) with both >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")


def sample_scene(rng: np.random.Generator, cfg: SceneConfig | None = None, max_tries: int = 20) -> Scene:
    """Draw a scene from ``rng`` and render it. Objects never interpenetrate; objects that end up
    (almost) hidden are removed so that every annotated object is visible."""
    cfg = cfg or SceneConfig()
    min_px = max(6, int(cfg.min_visible_frac * cfg.image_size[0] * cfg.image_size[1]))
    for _ in range(max_tries):
        scene = _draw_layout(rng, cfg)
        _prune(scene)
        scene.render()
        while True:  # the exact check at full resolution
            bad = [k for k, a in enumerate(scene.areas) if a < min_px
                   or (scene.objects[k].category == PERSON and _few_joints(scene.keypoints[k]))]
            if not bad:
                break
            scene.objects = [o for k, o in enumerate(scene.objects) if k not in bad]
            scene.render()
        if len(scene.objects) >= min(cfg.min_objects, 2):
            return scene
    raise RuntimeError(f"could not draw a scene with >= 2 visible objects in {max_tries} tries")


def _prune(scene: Scene) -> None:
    """Cheap early removal (saves full renders): people with fewer than 5 joints inside the image."""
    h, w = scene.image_hw
    keep = []
    for o in scene.objects:
        if o.category == PERSON:
            xy, z = scene.camera.project(o.joints)
            if int(((z > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)).sum()) < 5:
                continue
        keep.append(o)
    scene.objects = keep


def _few_joints(kp: np.ndarray) -> bool:
    return int((kp[:, 2] > 0).sum()) < 5


def _draw_layout(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    cam = Camera(height=float(rng.uniform(1.5, 2.0)), pitch=math.radians(float(rng.uniform(14, 24))),
                 fov_y=math.radians(cfg.fov_y_deg), image_hw=cfg.image_size)
    light = _normalize(np.array([rng.uniform(-0.8, 0.8), rng.uniform(1.1, 1.8), rng.uniform(0.2, 0.9)]))
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_people = 0
    if cfg.max_people > 0 and rng.random() < cfg.person_prob:
        n_people = 1 + int(rng.random() < 0.3) if cfg.max_people > 1 else 1
    n_people = min(n_people, n_obj)
    tx, _ = cam.tan_half
    objects: list[SceneObject] = []
    for i in range(n_obj):
        for _attempt in range(30):
            depth = float(rng.uniform(cfg.near, cfg.far))
            half_w = depth * tx * 0.85
            x = float(rng.uniform(-half_w, half_w))
            z = -depth  # the ground point's distance along -z (the camera is at z=0)
            yaw = float(rng.uniform(-math.pi, math.pi))
            if i < n_people:
                obj = _person_object(
                    shirt=str(rng.choice(list(COLORS))), pants=str(rng.choice(list(PANTS))),
                    skin=SKIN[int(rng.integers(len(SKIN)))], pose=str(rng.choice(POSES)), x=x, z=z, yaw=yaw,
                    scale=float(rng.uniform(0.92, 1.06)), rng=rng)
            else:
                obj = _shape_object(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))),
                                    str(rng.choice(list(SIZES))), x, z, yaw)
            if all(math.hypot(obj.x - p.x, obj.z - p.z) > obj.radius + p.radius + 0.08 for p in objects):
                objects.append(obj)
                break
    return Scene(camera=cam, floor=str(rng.choice(list(FLOORS))), wall=str(rng.choice(list(WALLS))),
                 wall_distance=float(rng.uniform(8.2, 9.0)), light=light, objects=objects)
