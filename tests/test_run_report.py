"""The run report (RUN/report.html, `radpretrain report`), RUN/compute.json and RUN/data_summary.json."""

import json
import re
import shutil

import pandas as pd
import pytest

from radpretrain.cli import main
from radpretrain.data.store import Store
from radpretrain.pretrain import pretrain, write_run_report
from radpretrain.pretrain import runner as runner_module
from radpretrain.synthetic.toy import make_toy_store

FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1", "data.batch_size=8",
        "trainer.log_every_n_steps=1", "data.image_size=32", "model.backbone=test_efficientnet",
        "model.pretrained=none"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "ds", n_patients=16, images_per_patient=2, size=(36, 36))


@pytest.fixture(scope="module")
def run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "simclr-toy"
    res = pretrain("simclr", ds, out, overrides=FAST + ["trainer.max_steps=6", "data.val_fraction=0.25"])
    assert res["report"] == out / "report.html"
    return out


def _sections(html: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", html)


def test_run_writes_compute_data_summary_and_report(run, ds):
    compute = json.loads((run / "compute.json").read_text())
    assert compute["steps"] == 6 and compute["images_seen"] == 6 * 8  # 6 steps of 8 images, one process
    assert compute["wall_seconds"] > 0 and compute["images_per_s"] > 0 and compute["finished"]
    assert compute["device"]["type"] == "cpu" and compute["device"]["name"] and compute["torch_threads"] == 1
    assert compute["method"] == "simclr" and not compute["partial_record"]
    data = json.loads((run / "data_summary.json").read_text())
    assert data["train"]["images"] + data["val"]["images"] == data["store_images"] == 32
    assert sum(data["train"]["body_part"].values()) == data["train"]["images"]
    assert set(data["train"]["body_part"]) <= {"hand", "knee", "chest"}
    metrics = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    ips = metrics["train/images_per_s"].dropna()
    assert len(ips) == 6 and (ips > 0).all()

    html = (run / "report.html").read_text()
    assert _sections(html) == ["Loss and learning rate", "Throughput", "Previews", "Data", "Compute (compute.json)",
                               "Encoder (encoder.json)", "Resolved config (config.yaml, paths removed)", "Versions"]
    assert "SimCLR: rows = input, view 1, view 2" in html and "simclr_views_step0000006.png" in html
    # loss/lr figure, throughput figure, first and latest preview: all inside the page
    assert html.count("data:image/png;base64,") >= 4
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html
    assert "finished (encoder written)" in html and "best validation loss" in html
    # no paths and no patient data: the store's and the run's absolute paths, ids and source tokens
    images = Store(ds).manifest
    assert str(ds) not in html and str(run.resolve()) not in html and "&lt;path removed&gt;" in html
    for col in ("patient_id", "image_id", "study_id", "source"):
        assert not any(v in html for v in images[col].astype(str) if v), col
    for name in ("data_summary.json", "compute.json"):
        text = (run / name).read_text()
        assert str(ds) not in text and not any(p in text for p in images["patient_id"])


def test_report_command_rewrites_an_interrupted_run(run, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "encoder.safetensors").unlink()
    (cut / "report.html").unlink()
    c = json.loads((cut / "compute.json").read_text())
    (cut / "compute.json").write_text(json.dumps({**c, "finished": False}))
    assert main(["report", str(cut)]) == 0
    assert capsys.readouterr().out.strip() == str(cut / "report.html")
    html = (cut / "report.html").read_text()
    assert "interrupted (continue it with --resume)" in html and "Loss and learning rate" in html
    # a run that has logged nothing yet still gets a page
    (cut / "logs" / "csv" / "metrics.csv").unlink()
    (cut / "compute.json").unlink()
    write_run_report(cut)
    html = (cut / "report.html").read_text()
    assert "No logs/csv/metrics.csv yet." in html and "running or stopped without an encoder" in html
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_deepcluster_records_give_nmi_and_cluster_sizes(run, tmp_path):
    d = tmp_path / "dc"
    shutil.copytree(run, d)
    recs = [{"epoch": e, "n_images": 24, "k": 4, "nmi_prev": None if e == 0 else 0.5 + 0.1 * e, "n_empty_fixed": 0,
             "sizes": {"min": 2 + e, "q1": 4, "median": 6, "q3": 8, "max": 10 - e}, "seconds": 0.1} for e in range(3)]
    lines = [json.dumps(r) for r in recs]
    lines.insert(1, json.dumps({**recs[1], "nmi_prev": 0.01}))  # a resumed run re-clustered epoch 1: the later wins
    (d / "clusters.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 3, \"trunc")  # a line cut by a kill
    html = (write_run_report(d)).read_text()
    assert "DeepCluster: assignments per epoch" in html
    table = html[html.index("DeepCluster: assignments per epoch"):]
    assert "0.600" in table and "0.700" in table and "0.010" not in table
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
    assert ["2", "24", "4", "0.700", "4", "6", "8", "0", "0.1"] in cells  # epoch 2: NMI, smallest, median, largest


def test_resumed_run_adds_to_the_compute_of_the_interrupted_one(ds, tmp_path):
    common = FAST + ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=3", "export.weights=last"]
    full = tmp_path / "full"
    pretrain("simclr", ds, full, overrides=common)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    shutil.copy(full / "checkpoints" / "step0000003.ckpt", cut / "checkpoints" / "last.ckpt")
    pretrain("simclr", ds, cut, resume=True)
    a, b = (json.loads((r / "compute.json").read_text()) for r in (full, cut))
    assert a["images_seen"] == b["images_seen"] == 8 * 8 and a["steps"] == b["steps"] == 8
    assert b["wall_seconds"] > 0 and not b["partial_record"]


def test_a_failing_report_is_a_warning_not_a_crash(ds, tmp_path, monkeypatch, caplog):
    def broken(run_dir):
        raise ValueError("drawing failed")

    monkeypatch.setattr(runner_module, "write_run_report", broken)
    with caplog.at_level("WARNING", logger="radpretrain"):
        res = pretrain("simclr", ds, tmp_path / "r", overrides=FAST + ["trainer.max_steps=2"])
    assert res["encoder"].is_file() and res["report"] is None
    assert "run report not written (ValueError: drawing failed)" in caplog.text and "radpretrain report" in caplog.text
