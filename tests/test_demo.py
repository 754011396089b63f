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


def test_demo_stage_commands_and_reuse(tmp_path, monkeypatch):
    """The stages a demo runs (stubbed), the recommended recipe, and reuse of finished stages."""
    import argparse
    import json

    from radpretrain import demo

    calls = []
    where = {"out": tmp_path / "d"}

    def fake_step(title, argv, stdout_to=None):
        calls.append(argv)
        out = where["out"]
        done = {"synth": out / "archive" / "labels.csv", "ingest": out / "dataset" / "manifest.parquet",
                "split": out / "dataset" / "splits.parquet", "pretrain": out / "pretrain" / "encoder.safetensors",
                "evaluate": out / "evaluate" / "summary.json", "export": out / "encoder" / "model.safetensors"}
        if argv[0] in done:
            done[argv[0]].parent.mkdir(parents=True, exist_ok=True)
            done[argv[0]].write_text(json.dumps({"headline": []}))
        if argv[0] == "ingest":
            (out / "dataset" / "qc_summary.json").write_text("{}")

    monkeypatch.setattr(demo, "_step", fake_step)
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "d")])
    assert demo.run(args) == 0
    stages = [c[0] for c in calls]
    assert stages == ["synth", "ingest", "split", "info", "pretrain", "evaluate", "export"]
    pre = calls[stages.index("pretrain")]
    assert "--config" not in pre and "--method" not in pre and "trainer.max_steps=150" in pre  # recommended recipe
    ev = calls[stages.index("evaluate")]
    assert ev.count("--init") == 3 and "imagenet" in ev and "0.01,0.1,1.0" in ev
    calls.clear()
    assert demo.run(args) == 0
    assert [c[0] for c in calls] == ["info"]  # everything else reused
    calls.clear()
    where["out"] = tmp_path / "e"
    assert demo.run(p.parse_args(["--out", str(tmp_path / "e"), "--method", "mae"])) == 0
    mae = [c for c in calls if c[0] == "pretrain"][0]
    assert "--config" not in mae and mae[mae.index("--method") + 1] == "mae"  # its <method>_cpu preset


def test_verdict_says_where_ours_won_and_why_not_elsewhere():
    from radpretrain.demo import verdict

    row = lambda f, d, lo, hi: {"init": "run", "protocol": "linear", "fraction": f, "delta_vs_imagenet": d,  # noqa: E731
                                "delta_vs_imagenet_ci": [lo, hi]}
    scratch = {**row(1.0, -0.3, -0.4, -0.2), "init": "scratch"}  # scratch's own difference is not ours
    s = {"headline": [scratch, row(0.01, 0.06, 0.02, 0.1), row(0.1, -0.05, -0.09, -0.01), row(1.0, 0.0, -0.02, 0.02)]}
    lines = verdict(s, recommended=True, synthetic=True)
    assert "better at 1% labels; worse at 10%; not distinguishable at 100%." in lines[0]
    assert any("synthetic" in x for x in lines) and any("docs/recipes.md" in x for x in lines)
    assert verdict(s, recommended=False, synthetic=False) == lines[:1]
    all_won = {"headline": [row(0.1, 0.06, 0.02, 0.1)]}
    assert len(verdict(all_won, True, True)) == 1 and verdict({"headline": []}, True, True) == []
