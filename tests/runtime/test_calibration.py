import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import CalibrationError
from onnxcompress.runtime.calibration import Histogram, Statistic, StatisticRequest, _run_in_order, collect_statistics


def _model(opset: int):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_statistics_match_numpy_across_batches_and_dynamic_shapes(opset):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(n, 3, h, 5)).astype(np.float32)} for n, h in [(1, 4), (3, 7), (2, 2)]]
    requests = [StatisticRequest("x", Statistic.MIN_MAX), StatisticRequest("y", Statistic.MIN_MAX),
                StatisticRequest("x", Statistic.CHANNEL_MEAN, axis=1),
                StatisticRequest("x", Statistic.CHANNEL_MEAN, axis=1),  # duplicates are collected once
                StatisticRequest("r", Statistic.CHANNEL_MEAN, axis=-1, channels=5),
                StatisticRequest("r", Statistic.CHANNEL_MEAN_SQUARE, axis=-1, channels=5),
                StatisticRequest("r", Statistic.HISTOGRAM)]
    stats = collect_statistics(_model(opset), requests, feeds, progress=False)
    xs = [f["x"] for f in feeds]
    per_sample_min = np.concatenate([x.reshape(len(x), -1).min(axis=1) for x in xs])
    assert stats["x"].min == pytest.approx(min(x.min() for x in xs))
    assert stats["x"].mean_min == pytest.approx(per_sample_min.mean())
    assert stats["y"].max == pytest.approx(-min(np.maximum(x, 0).min() for x in xs))
    # An image tensor's channel mean averages the samples' own means (samples of any size weigh the same).
    per_sample_means = np.concatenate([x.mean(axis=(2, 3)) for x in xs])
    np.testing.assert_allclose(stats["x"].channel_mean, per_sample_means.mean(axis=0), rtol=1e-5)
    last = np.concatenate([np.maximum(x, 0).reshape(-1, 5) for x in xs])
    np.testing.assert_allclose(stats["r"].channel_mean, last.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["r"].channel_mean_square, (last ** 2).mean(axis=0), rtol=1e-5)
    histogram = stats["r"].histogram
    assert histogram.counts.sum() == sum(x.size for x in xs)
    assert histogram.high >= max(x.max() for x in xs)


@pytest.mark.parametrize("opset", [13, 18])
def test_image_statistics_through_global_pooling_match_numpy(opset):
    """NCHW tensors with static channels take the pooling path; results equal the plain reductions."""
    model = _model(opset)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5]))
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 3, 4, 5]))
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 3, 4, 5)).astype(np.float32) for n in (1, 3, 2)]
    requests = [StatisticRequest("x", Statistic.MIN_MAX), StatisticRequest("r", Statistic.MIN_MAX),
                StatisticRequest("x", Statistic.CHANNEL_MEAN, axis=1, channels=3),
                StatisticRequest("r", Statistic.CHANNEL_MEAN, axis=1)]
    stats = collect_statistics(model, requests, [{"x": x} for x in xs], progress=False)
    for name, values in (("x", xs), ("r", [np.maximum(x, 0) for x in xs])):
        rows = np.concatenate([v.reshape(len(v), -1) for v in values])
        np.testing.assert_array_equal(np.concatenate(stats[name].sample_min), rows.min(axis=1))
        np.testing.assert_array_equal(np.concatenate(stats[name].sample_max), rows.max(axis=1))
        channels = np.concatenate([v.transpose(1, 0, 2, 3).reshape(3, -1) for v in values], axis=1)
        np.testing.assert_allclose(stats[name].channel_mean, channels.mean(axis=1), rtol=1e-5, atol=1e-7)
        assert stats[name].channel_count == sum(len(v) for v in values)  # one mean per sample


def test_image_channel_mean_weighs_every_sample_alike_when_sizes_differ():
    """With dynamic H and W each sample contributes its own per-channel mean, not its pixel count."""
    model = _model(17)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"]))
    rng = np.random.default_rng(4)
    xs = [rng.normal(loc=i, size=(1, 3, h, w)).astype(np.float32) for i, (h, w) in enumerate([(2, 3), (8, 9), (5, 4)])]
    stats = collect_statistics(model, [StatisticRequest("x", Statistic.CHANNEL_MEAN, axis=1, channels=3)],
                               [{"x": x} for x in xs], progress=False)
    expected = np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0)
    np.testing.assert_allclose(stats["x"].channel_mean, expected, rtol=1e-5)
    assert stats["x"].channel_count == 3


def test_relu_output_minimum_is_zero_without_measuring_it():
    # Positive inputs: the ReLU output's true minimum is above zero, but every range includes zero anyway.
    xs = [np.random.default_rng(2).uniform(1, 2, size=(2, 3, 4, 5)).astype(np.float32)]
    stats = collect_statistics(_model(13), [StatisticRequest("r", Statistic.MIN_MAX)], [{"x": x} for x in xs],
                               progress=False)
    np.testing.assert_array_equal(np.concatenate(stats["r"].sample_min), [0, 0])
    np.testing.assert_array_equal(np.concatenate(stats["r"].sample_max), xs[0].reshape(2, -1).max(axis=1))


def test_histogram_widening_keeps_counts_exact():
    histogram = Histogram(bins=8)
    histogram.add(np.array([0.1, 0.2, 0.9]))
    histogram.add(np.array([3.5, -2.0]))
    assert histogram.counts.sum() == 5
    assert histogram.low <= -2.0 and histogram.high >= 3.5
    # Merged bins stay aligned with zero, so the split of mass around it is exact.
    zero = int(np.argmin(np.abs(histogram.edges)))
    assert histogram.edges[zero] == pytest.approx(0.0, abs=1e-9)
    assert histogram.counts[:zero].sum() == 1 and histogram.counts[zero:].sum() == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_feed_is_a_calibration_error(workers):
    good = {"x": np.zeros((1, 3, 4, 5), np.float32)}
    with pytest.raises(CalibrationError, match="failed on a calibration batch"):
        collect_statistics(_model(17), [StatisticRequest("x", Statistic.MIN_MAX)],
                           [good, {"x": np.zeros((1, 4, 4, 5), np.float32)}, good], progress=False, workers=workers)


def test_concurrent_runs_give_the_statistics_of_one_run_in_feed_order():
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(n, 3, 6, 5)).astype(np.float32)} for n in (2, 1, 3, 2, 2, 1, 4)]
    requests = [StatisticRequest("y", Statistic.MIN_MAX), StatisticRequest("r", Statistic.CHANNEL_MEAN, axis=1)]
    one, three = (collect_statistics(_model(17), requests, feeds, progress=False, workers=w) for w in (1, 3))
    expected_max = np.concatenate([-np.maximum(f["x"], 0).reshape(len(f["x"]), -1).min(axis=1) for f in feeds])
    np.testing.assert_array_equal(np.concatenate(three["y"].sample_max), expected_max)
    np.testing.assert_array_equal(np.concatenate(one["y"].sample_max), expected_max)
    np.testing.assert_allclose(three["r"].channel_mean, one["r"].channel_mean, rtol=1e-6)


def test_feeds_in_flight_are_bounded_by_the_workers():
    """Memory must not grow with the data set: the feeds are read only as runs finish."""
    pulled = []

    def feeds():
        for index in range(10):
            pulled.append(index)
            yield {"x": np.full((1, 1), index, np.float32)}

    class EchoSession:
        def run(self, names, feed):
            return [feed["x"]]

    for done, (samples, outputs) in enumerate(_run_in_order(EchoSession(), ["x"], feeds(), workers=3)):
        assert samples == 1 and outputs[0][0, 0] == done  # in feed order
        assert len(pulled) - done <= 3


def test_large_weights_reach_the_session_as_arrays_and_give_exact_statistics():
    """A weight over the in-memory threshold leaves the serialized model; the statistics are still exact."""
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(64, 128)).astype(np.float32)  # 32 KiB: handed over as an array
    offset = rng.normal(size=(128,)).astype(np.float32)  # 512 B: stays in the model
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(offset, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    xs = [rng.normal(size=(n, 64)).astype(np.float32) for n in (2, 5)]
    stats = collect_statistics(model, [StatisticRequest("y", Statistic.MIN_MAX)], [{"x": x} for x in xs],
                               progress=False)
    expected = np.concatenate([x @ weight + offset for x in xs])
    np.testing.assert_allclose(np.concatenate(stats["y"].sample_max), expected.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(stats["y"].sample_min), expected.min(axis=1), rtol=1e-5)


@pytest.mark.parametrize(("shape", "expected"), [
    (["N", 3, 224, 224], 2),  # small fixed images: two runs at once
    (["N", 3, "H", "W"], 1),  # images of any size: one at a time (memory; every op has work for all cores)
    (["N", 3, 1024, 1024], 1),
    (["N", "S"], 2),  # token sequences of variable length stay small
])
def test_default_workers_follow_the_input_size(monkeypatch, shape, expected):
    from onnxcompress.runtime import calibration
    monkeypatch.setattr(calibration, "_cores", lambda: 2)
    model = _model(17)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, shape))
    assert calibration.default_workers(model) == expected
