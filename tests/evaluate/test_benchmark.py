"""benchmarks/evaluate.py's core (what --quick runs), on tiny backbones so it fits in CI."""

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("evaluate")


def test_benchmark_core_times_features_and_an_epoch(bench):
    out = bench.run_benchmark(["resnet18", "test_efficientnet", "vit_tiny"], device="cpu", image_size=32,
                              n_features=8, n_train=6, feature_batch=4, finetune_batch=2, warmup_batches=1, quick=True)
    json.dumps(out)  # the JSON line
    assert out["device"]["type"] == "cpu" and out["image_size"] == 32
    for arch, r in out["results"].items():
        assert r["features_images_per_s"] > 0 and r["finetune_images_per_s"] > 0, arch
        assert r["finetune_timed_images"] == 4 and r["images_fed"] == "host"
    assert out["results"]["test_efficientnet"]["channels_last"]  # depthwise convolutions: the CPU rule
    assert not out["results"]["vit_tiny"]["channels_last"]


def test_epoch_clock_times_only_the_batches_after_the_warm_up(bench):
    import torch

    c = bench.EpochClock(torch.device("cpu"), skip=2, total=5)
    c.update(1)
    assert c.t0 is None
    c.update(1)
    assert c.t0 is not None and c.t1 is None
    c.update(3)
    assert c.t1 is not None and c.seconds() >= 0
    with pytest.raises(ValueError, match="n_train"):
        bench.bench_arch("resnet18", None, n_train=2, finetune_batch=2, warmup_batches=2)
