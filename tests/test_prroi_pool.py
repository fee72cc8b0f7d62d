"""Precise RoI Pooling against a brute-force integration of the bilinear surface, gradients, ONNX."""
import math

import pytest
import torch

from upernet.ops.prroi_pool import PrRoIPool2d, prroi_pool2d, prroi_pool2d_whole

pytestmark = pytest.mark.usefixtures("one_thread")


def surface(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """The bilinear interpolation of one (C, H, W) map at (y, x), pixels outside the map reading 0."""
    h, w = feature.shape[-2:]
    out = feature.new_zeros(feature.shape[0])
    for i in (math.floor(y), math.floor(y) + 1):
        for j in (math.floor(x), math.floor(x) + 1):
            if 0 <= i < h and 0 <= j < w:
                out += feature[:, i, j] * (1 - abs(y - i)) * (1 - abs(x - j))
    return out


def midpoints(a: float, b: float, steps: int) -> list[tuple[float, float]]:
    """(midpoint, length) of a midpoint rule on [a, b]: `steps` cells between consecutive integers and
    the ends, so that no cell straddles a kink of the surface."""
    cuts = sorted({a, b, *range(math.ceil(a), math.floor(b) + 1)})
    cells = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        cells += [(lo + (k + 0.5) * (hi - lo) / steps, (hi - lo) / steps) for k in range(steps)]
    return cells


def brute_force(features: torch.Tensor, roi: list[float], out_h: int, out_w: int, scale: float) -> torch.Tensor:
    """The average of the surface over each bin by a midpoint rule in float64."""
    batch, x0, y0, x1, y1 = roi
    x0, y0, x1, y1 = (v * scale for v in (x0, y0, x1, y1))
    feature = features[int(batch)].double()
    bh, bw = max(y1 - y0, 0) / out_h, max(x1 - x0, 0) / out_w
    out = torch.zeros(feature.shape[0], out_h, out_w, dtype=torch.float64)
    for p in range(out_h):
        for q in range(out_w):
            if bh * bw == 0:
                continue
            total = 0
            for y, dy in midpoints(y0 + p * bh, y0 + (p + 1) * bh, 3):
                for x, dx in midpoints(x0 + q * bw, x0 + (q + 1) * bw, 3):
                    total = total + surface(feature, y, x) * dy * dx
            out[:, p, q] = total / (bh * bw)
    return out


def test_whole_map_matches_numerical_integration():
    """The layout's case: the RoI (0, 0, W, H) cut into s x s bins, s = 1, 2, 3, 6 (bins straddle pixels)."""
    torch.manual_seed(0)
    features = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for s in (1, 2, 3, 6):
        pooled = prroi_pool2d_whole(features, s)
        for n in range(2):
            expected = brute_force(features, [n, 0, 0, 7, 5], s, s, 1.0)
            torch.testing.assert_close(pooled[n], expected, rtol=1e-12, atol=1e-12)


def test_general_rois_match_numerical_integration():
    """Fractional corners, a RoI hanging off the map, spatial scale, an empty RoI (pools to 0)."""
    torch.manual_seed(1)
    features = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    rois = torch.tensor([[0, 0.3, 1.2, 3.7, 4.9], [1, -1.5, -0.5, 6.2, 7.0], [1, 2.0, 2.0, 2.0, 5.0],
                         [0, 2.0, 4.0, 9.0, 11.0]], dtype=torch.float64)
    for scale in (1.0, 0.5):
        pooled = prroi_pool2d(features, rois, (2, 3), scale)
        for r, roi in enumerate(rois.tolist()):
            torch.testing.assert_close(pooled[r], brute_force(features, roi, 2, 3, scale), rtol=1e-12, atol=1e-12)
    assert pooled[2].abs().max() == 0


def test_float32_within_rounding():
    torch.manual_seed(2)
    features = torch.randn(1, 4, 9, 11)
    expected = prroi_pool2d_whole(features.double(), 6)
    torch.testing.assert_close(prroi_pool2d_whole(features, 6).double(), expected, rtol=1e-5, atol=1e-6)


def test_gradcheck_features_and_rois():
    torch.manual_seed(3)
    features = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    corners = torch.tensor([[0.3, 0.6, 3.4, 3.2]], dtype=torch.float64, requires_grad=True)

    def pool(f, c):
        return prroi_pool2d(f, torch.cat([torch.zeros(1, 1, dtype=torch.float64), c], 1), (2, 2), 1.0)

    assert torch.autograd.gradcheck(pool, (features, corners))
    assert torch.autograd.gradcheck(lambda f: prroi_pool2d_whole(f, 3), (features,))


def test_module_whole_map_is_the_roi_of_the_whole_map():
    torch.manual_seed(4)
    features = torch.randn(2, 3, 4, 6)
    rois = torch.tensor([[0, 0, 0, 6, 4], [1, 0, 0, 6, 4]], dtype=torch.float32)
    torch.testing.assert_close(PrRoIPool2d(3)(features), PrRoIPool2d(3)(features, rois))


def test_onnx_export(tmp_path):
    """A PPM-like module (pool the whole map, resize back) exports and runs in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(prroi_pool2d_whole(x, 3), size=x.shape[-2:], mode="bilinear")

    x = torch.randn(1, 4, 5, 7)
    path = tmp_path / "pool.onnx"
    torch.onnx.export(Pool(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), Pool()(x), rtol=1e-5, atol=1e-5)
