import numpy as np
import pytest

from onnxcompress.algorithms.quantization.scheme import (
    Mode, activation_levels, activation_params, align_zero_point, fake_quantize, quantize_weight,
    unified_activation_params, weight_levels)


def test_level_ranges_follow_table_1():
    assert (weight_levels(8).q_min, weight_levels(8).q_max) == (-127, 127)
    assert (weight_levels(4).q_min, weight_levels(4).q_max) == (-7, 7)
    signed, unsigned = activation_levels(8, signed=True), activation_levels(8, signed=False)
    assert (signed.q_min, signed.q_max) == (-128, 127)
    assert (unsigned.q_min, unsigned.q_max) == (0, 255)


@pytest.mark.parametrize("r_min, r_max", [(-1.0, 3.0), (-0.3, 0.7), (-5.0, 0.01), (0.2, 4.0), (-2.0, -0.5)])
def test_zero_point_alignment_maps_zero_exactly(r_min, r_max):
    low, high = align_zero_point(r_min, r_max)
    assert low <= 0 <= high
    assert low <= min(r_min, 0) + 1e-9 or high >= max(r_max, 0) - 1e-9  # one end is kept
    scale = (high - low) / 255
    zero_point = -low / scale
    assert abs(zero_point - round(zero_point)) < 1e-6
    params = activation_params(r_min, r_max, Mode.ASYMMETRIC)
    assert fake_quantize(np.zeros(1, np.float32), params)[0] == 0.0


def test_weights_are_symmetric_per_channel_within_127():
    weight = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32)
    weight[2] *= 10
    quantized, params = quantize_weight(weight, axis=0)
    assert quantized.dtype == np.int8 and quantized.min() >= -127 and quantized.max() <= 127
    assert params.scale.shape == (6,)
    assert np.abs(quantized).reshape(6, -1).max(axis=1).tolist() == [127] * 6
    error = np.abs(quantized * params.scale[:, None, None, None] - weight)
    assert np.all(error <= params.scale[:, None, None, None] / 2 + 1e-7)


def test_symmetric_activations_pick_signed_or_unsigned_levels():
    relu_like = activation_params(0.0, 6.0, Mode.SYMMETRIC)
    assert relu_like.zero_point == 0 and relu_like.scale == pytest.approx(6.0 / 255)
    assert relu_like.zero_point.dtype == np.uint8
    signed = activation_params(-2.0, 4.0, Mode.SYMMETRIC)
    assert signed.zero_point == 0 and signed.zero_point.dtype == np.int8 and signed.scale == pytest.approx(4.0 / 127)


def test_unified_group_shares_one_step_and_keeps_relu_members_unsigned():
    params = unified_activation_params([(0.0, 3.0), (-1.0, 2.0)], Mode.SYMMETRIC)
    assert params[0].scale == params[1].scale == pytest.approx(3.0 / 127)
    assert [p.zero_point.dtype for p in params] == [np.uint8, np.int8]
    asym = unified_activation_params([(0.0, 3.0), (-1.0, 2.0)], Mode.ASYMMETRIC)
    assert asym[0].scale == asym[1].scale == pytest.approx(4.0 / 255, rel=0.02)  # aligned: slightly wider
    assert int(asym[0].zero_point) == 0  # the ReLU-like member
    assert int(asym[1].zero_point) == round(1.0 / float(asym[1].scale)) == 63
