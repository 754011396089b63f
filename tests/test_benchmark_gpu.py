"""benchmarks/gpu.py --smoke: its core function on the CPU at tiny sizes (every method, the engine end to end)."""

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("gpu")


def test_smoke_measures_every_method(bench):
    """About 15-40 s on the 2-core machine (timm's test_resnet, a one-block ViT, 32 px, a few steps)."""
    res = bench.run_benchmark(bench.parse_args(["--smoke", "--threads", "1"]))
    assert res["smoke"] and res["device"] == "cpu" and res["peak_bf16_tflops"] is None
    assert set(res["methods"]) == set(bench.GPU_PRESETS)
    for name, r in res["methods"].items():
        assert r["preset"] == bench.GPU_PRESETS[name] and r["batch"] == 8
        for k in ("compute_img_s", "loader_img_s", "e2e_img_s", "e2e_median_step_img_s", "gflop_per_img"):
            assert r[k] > 0, (name, k, r)
        assert r["e2e_over_compute"] == round(r["e2e_img_s"] / r["compute_img_s"], 3)
        assert r["loader_over_compute"] == round(r["loader_img_s"] / r["compute_img_s"], 3)
        assert r["mfu"] is None and r["resize_on"] == "loader" and r["global_step"] == 4
    m = res["methods"]
    # FlopCounterMode counts what each step runs: SimCLR's two views through the same encoder as metadata's one
    assert 1.6 < m["simclr"]["gflop_per_img"] / m["metadata"]["gflop_per_img"] < 2.6
    assert m["genesis"]["gflop_per_img"] > m["metadata"]["gflop_per_img"]  # the U-Net decoder
    rc = m["deepcluster"]["recluster"]
    assert rc["images"] == 256 and rc["clusters"] == 4 and rc["backend"] == "faiss-cpu" and rc["n_empty_fixed"] >= 0
    assert rc["seconds_total"] >= rc["seconds_features"] > 0 and rc["seconds_torch_kmeans_cpu"] >= 0  # rounded to 0.01 s
    assert 0 < m["deepcluster"]["e2e_incl_recluster_img_s_derived"] < m["deepcluster"]["e2e_median_step_img_s"]


def test_smoke_with_the_device_letterbox_and_compile_switches(bench):
    args = bench.parse_args(["--smoke", "--threads", "1", "--methods", "metadata", "--skip-e2e",
                             "--override", "data.resize_on=device"])
    r = bench.run_benchmark(args)["methods"]["metadata"]
    assert r["resize_on"] == "device" and r["device_letterbox_ms_per_batch"] > 0 and r["loader_img_s"] > 0
    assert "e2e_img_s" not in r and "e2e_over_compute" not in r


def test_peak_flops_table_and_memory_estimate(bench, tmp_path):
    assert bench.peak_tflops("NVIDIA H200")[0] == 989.4 and bench.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert bench.peak_tflops("NVIDIA H200 NVL")[0] == 835.5 and bench.peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bench.peak_tflops("Some New GPU") == (None, None) and bench.peak_tflops(None) == (None, None)
    assert bench.peak_tflops("Some New GPU", 500.0) == (500.0, "--peak-tflops")
    root = bench.make_bench_store(tmp_path / "store", 16, size=(96, 80))
    args = bench.parse_args(["--override", "model.backbone=test_resnet", "--override", "data.image_size=32"])
    est = bench.memory_estimate("simclr", root, args)
    assert est["activations_mb_per_img"] > 0 and est["params_m"] > 0
    assert est["estimated_gb"] > est["weights_grads_optimizer_gb"] and est["max_batch_24gb"] > est["batch"]
