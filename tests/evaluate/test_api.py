"""``radpretrain.evaluate.evaluate()`` (what the command runs), the protocol registry and --device."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import radpretrain.evaluate as E
from radpretrain.cli import main
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.evaluate.protocols import PROTOCOLS, FineTune, FoldData, KnnProbe, LinearProbe, get_protocol

SMALL = dict(backbone="test_efficientnet", image_size=32, label_fractions=[1.0], folds=2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "store", n_patients=16, images_per_patient=2, size=(36, 36))


def test_registry_and_fold_data():
    assert list(PROTOCOLS) == ["linear", "knn", "finetune"]
    assert get_protocol("knn") is KnnProbe and not FineTune.uses_features and LinearProbe.uses_features
    with pytest.raises(UserError, match="--protocol svm"):
        get_protocol("svm")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    d = FoldData(fold=0, fraction=1.0, train=np.arange(40), val=np.arange(40, 50), test=np.arange(50, 60), y=y,
                 task="binary", n_classes=2, features=X)
    r = LinearProbe({"C": [1.0], "pool": "default"}).run(d)  # pool is the runner's, not the probe's
    assert r.test_scores.shape == (10,) and r.chosen == {"C": 1.0}
    n1 = int(y[:40].sum())
    assert np.allclose(d.class_weights, [40 / (2 * (40 - n1)), 40 / (2 * n1)], rtol=1e-12)
    assert not d.single_class
    assert FoldData(0, 1.0, np.arange(3), np.arange(0), np.arange(0), np.zeros(3, int), "binary", 2).single_class
    with pytest.raises(ValueError, match="features"):
        KnnProbe().run(FoldData(0, 1.0, np.arange(3), np.arange(0), np.arange(0), y[:3], "binary", 2))


def test_programmatic_evaluate_returns_the_summary(toy, tmp_path, caplog):
    out = tmp_path / "ev"
    with caplog.at_level("INFO", logger="radpretrain"):
        s = E.evaluate(toy, "body_part==knee", ["scratch"], out=out, protocols=["linear", "finetune"],
                       overrides=["n_boot=50", "finetune.epochs=1", "finetune.batch_size=8"], device="auto",
                       report=False, **SMALL)
    assert s == json.loads((out / "summary.json").read_text())
    assert s["protocols"] == ["linear", "finetune"] and s["task"] == "binary"
    if not torch.cuda.is_available():
        assert s["device"]["type"] == "cpu" and s["device"]["requested"] == "auto"
        assert s["device"]["precision"] == "float32" and "running on the CPU" in caplog.text
    assert s["device"]["name"]
    # one log line per finished cell: 1 init x 2 protocols x 2 folds x 1 fraction
    assert "[4/4] scratch / finetune fold 1 fraction 1" in caplog.text and "[1/4] scratch / linear" in caplog.text
    assert not (out / "report.html").exists()
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    assert set(res["protocol"]) == {"linear", "finetune"}
    assert set(json.loads((out / "finetune_history.json").read_text())["scratch"]) == {"1/0", "1/1"}


def test_cli_and_api_agree(toy, tmp_path):
    """The command is a thin layer over evaluate(): same numbers for the same arguments."""
    a, b = tmp_path / "api", tmp_path / "cli"
    E.evaluate(toy, "body_part==knee", ["scratch"], out=a, protocols=["knn"], overrides=["n_boot=30"],
               device="cpu", report=False, **SMALL)
    assert main(["evaluate", "--data", str(toy), "--target", "body_part==knee", "--init", "scratch", "--protocol",
                 "knn", "--label-fractions", "1", "--folds", "2", "--backbone", "test_efficientnet", "--image-size",
                 "32", "--device", "cpu", "--quiet-report", "n_boot=30", "--out", str(b)]) == 0
    ra, rb = pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv")
    pd.testing.assert_frame_equal(ra, rb)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(toy, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["evaluate", "--data", str(toy), "--target", "body_part", "--init", "scratch", "--device", "cuda",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda: CUDA is not available" in err
    assert not out.exists()


def test_api_argument_errors(toy, tmp_path):
    with pytest.raises(UserError, match="--balance often"):
        E.evaluate(toy, "body_part", ["scratch"], out=tmp_path / "x", balance="often")
    with pytest.raises(UserError, match="--protocol svm"):
        E.evaluate(toy, "body_part", ["scratch"], out=tmp_path / "x", protocols=["svm"])
    with pytest.raises(UserError, match="--init"):
        E.evaluate(toy, "body_part", [], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_import_cycle_inside_evaluate():
    """Module-level imports between radpretrain.evaluate's modules (the package's __init__ included) form no cycle."""
    import ast
    from pathlib import Path

    pkg = Path(E.__file__).parent
    names = {p.stem: p for p in pkg.glob("*.py")}

    def deps(path):
        out = set()
        for node in ast.parse(path.read_text()).body:
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for m in mods:
                if m == "radpretrain.evaluate":
                    out.add("__init__")
                elif m.startswith("radpretrain.evaluate.") and m.split(".")[2] in names:
                    out.add(m.split(".")[2])
        return out

    graph = {n: deps(p) for n, p in names.items()}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for d in graph[n]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert "api" in graph["__init__"] and "protocols" in graph["api"]
