"""The demo driver's headline table (the full demo is measured by benchmarks/demo.py)."""

from radpretrain.demo import headline_table


def test_headline_table_shows_ci_and_paired_deltas():
    summary = {"headline": [
        {"init": "scratch", "protocol": "linear", "fraction": 0.01, "metric": "auc", "value": 0.5,
         "ci_low": 0.42, "ci_high": 0.58},
        {"init": "run", "protocol": "linear", "fraction": 1.0, "metric": "auc", "value": 0.85,
         "ci_low": 0.81, "ci_high": 0.88, "delta_vs_scratch": 0.312, "delta_vs_scratch_ci": [0.26, 0.37],
         "p_vs_scratch": 0.002, "delta_vs_imagenet": -0.048, "delta_vs_imagenet_ci": [-0.082, -0.019],
         "p_vs_imagenet": 0.004},
    ]}
    lines = headline_table(summary).splitlines()
    assert lines[0].startswith("| protocol | labels | init | auc [95 % CI]")
    assert len(lines) == 4
    assert "| 1% | scratch | 0.500 [0.420, 0.580] | – | – |" in lines[2]
    assert "+0.312 [+0.260, +0.370] p=0.002" in lines[3]
    assert "-0.048 [-0.082, -0.019] p=0.004" in lines[3]


def test_headline_table_without_rows():
    assert "no headline" in headline_table({})
