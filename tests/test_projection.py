"""The projection: parity with a step-by-step NumPy reference, dtypes, persistence, bad input."""

import numpy as np
import pytest
import torch

from dresd_vllm.store.projection import Projection

H, D = 48, 16


@pytest.fixture(scope="module")
def states() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((8, H))
    x = centres[rng.integers(0, 8, 2000)] + rng.standard_normal((2000, H)) * rng.uniform(0.5, 2.0, H)
    x[:, 5] = 7.0  # a dead feature: std 0
    return (x + 10).astype(np.float32)


@pytest.fixture(scope="module")
def projection(states) -> Projection:
    return Projection.fit(states, dim=D, sample_size=None)


def reference(p: Projection, x: np.ndarray) -> np.ndarray:
    """The paper's steps one by one in float64: z-score, PCA, fp16, L2 normalise."""
    z = (x.astype(np.float64) - p.mean) / p.std
    y = ((z - p.pca_mean) @ p.components.T.astype(np.float64)).astype(np.float16).astype(np.float64)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float16)


def test_matches_numpy_reference(projection, states):
    x = states[:300]
    out = projection(torch.from_numpy(x))
    assert out.dtype == torch.float16 and out.shape == (300, D)
    np.testing.assert_allclose(out.float().numpy(), reference(projection, x).astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(out.float().norm(dim=1).numpy(), 1.0, atol=2e-3)


def test_fit_z_scores_with_the_sample_statistics(projection, states):
    np.testing.assert_allclose(projection.mean, states.mean(axis=0), rtol=1e-5, atol=1e-4)
    std = states.std(axis=0, dtype=np.float64)
    np.testing.assert_allclose(projection.std[std > 0], std[std > 0], rtol=1e-4)
    assert projection.std[5] == 1.0  # a constant feature is not divided by ~0
    assert projection.hidden_size == H and projection.dim == D
    # PCA axes of the z-scored data are orthonormal and sorted by explained variance
    np.testing.assert_allclose(projection.components @ projection.components.T, np.eye(D), atol=1e-5)
    z = (states - projection.mean) / projection.std
    variance = ((z - projection.pca_mean) @ projection.components.T).var(axis=0)
    assert np.all(np.diff(variance) <= 1e-4)


def test_fit_samples_by_seed(states):
    a = Projection.fit(states, dim=D, sample_size=500, seed=1)
    b = Projection.fit(states, dim=D, sample_size=500, seed=1)
    c = Projection.fit(states, dim=D, sample_size=500, seed=2)
    np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.array_equal(a.mean, c.mean)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype(projection, states, dtype):
    x = torch.from_numpy(states[:50])
    out = projection(x.to(dtype))
    cosine = (out.float() * projection(x).float()).sum(dim=1)
    assert out.dtype == torch.float16 and cosine.min() > 0.99


def test_huge_finite_values_do_not_overflow_fp16(projection, states):
    out = projection(torch.from_numpy(states[:4] * 1e6))
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.float().norm(dim=1).numpy(), 1.0, atol=2e-3)


def test_transform_is_the_same_projection(projection, states):
    expected = projection(torch.from_numpy(states[:100])).numpy()
    np.testing.assert_array_equal(projection.transform(states[:100], batch_size=32), expected)


def test_save_load_round_trip(projection, states, tmp_path):
    projection.save(tmp_path / "p.safetensors")
    loaded = Projection.load(tmp_path / "p.safetensors")
    x = torch.from_numpy(states[:64])
    assert torch.equal(loaded(x), projection(x))


def test_nan_and_inf_rows_are_named(projection, states):
    x = torch.from_numpy(states[:5].copy())
    x[1, 0] = float("nan")
    x[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf in 2 of 5 rows \(rows \[1, 3\]\)"):
        projection(x)


def test_project_masks_bad_rows_without_waiting_for_the_device(projection, states):
    """The served path's form: a flag per row instead of a check that reads the device's data."""
    from benchmarks.gpu_check import HostWaits

    x = torch.from_numpy(states[:4].copy())
    x[2, 5] = float("inf")
    with HostWaits() as waits:
        keys, finite = projection.project(x)
    assert waits.ops == [] and finite.tolist() == [True, True, False, True]
    assert torch.equal(keys[2], torch.zeros_like(keys[2])) and torch.equal(keys[[0, 1, 3]], projection(x[[0, 1, 3]]))


def test_wrong_hidden_size(projection):
    with pytest.raises(ValueError, match=rf"must be \[B, {H}\], got \(2, 7\)"):
        projection(torch.zeros(2, 7))


def test_fit_rejects_bad_input(states):
    bad = states[:100].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="1 of 100 sampled states have NaN/inf"):
        Projection.fit(bad, dim=4)
    with pytest.raises(ValueError, match="PCA dim 64 exceeds"):
        Projection.fit(states[:100], dim=64)


def test_load_truncated_file_names_it(projection, tmp_path):
    path = tmp_path / "p.safetensors"
    projection.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="p.safetensors"):
        Projection.load(path)
