"""Configs: packaged presets, strict keys and values in files and overrides, the CLI around them."""

from dataclasses import dataclass, field

import pytest
import yaml

from radpretrain.cli import main
from radpretrain.config import apply_overrides, check_config, is_preset, load_config_with_source, preset_names, preset_text
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.evaluate.options import parse_options
from radpretrain.pretrain.config import DEFAULTS, method_schema, resolve_config
from radpretrain.methods import get_method


def test_presets_ship_inside_the_package_and_name_their_method():
    names = preset_names()
    assert {"simclr_cpu", "mae_pilot", "genesis_thesis", "deepcluster_sarcoma", "dino_cpu"} <= set(names)
    for name in names:
        cfg = yaml.safe_load(preset_text(name))
        assert cfg["method"] in ("mae", "simclr", "dino", "deepcluster", "genesis", "metadata"), name
    assert not is_preset("no_such_preset") and not is_preset("../pyproject")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match=r"no such config file or packaged preset \(known presets: .*mae_pilot"):
        load_config_with_source("mae_pilotz")


@pytest.mark.parametrize("text, key, nearest", [
    ("method: mae\ntrainr:\n  max_steps: 3\n", "'trainr'", "'trainer'"),
    ("method: mae\ndata: {imagesize: 32}\n", "'data.imagesize'", "'image_size'"),
    ("method: mae\nmae: {mask_ration: 0.5}\n", "'mae.mask_ration'", "'mask_ratio'"),
    ("method: genesis\nmodel: {decoder_nrom: batch}\n", "'model.decoder_nrom'", "'decoder_norm'"),
    ("method: simclr\naugment: {blur: 0.5}\n", "'augment.blur'", "'blur_p'"),
])
def test_a_typo_in_a_yaml_file_is_an_error_naming_file_key_and_nearest(tmp_path, text, key, nearest):
    f = tmp_path / "my.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        resolve_config(None, str(f))
    msg = str(e.value)
    assert str(f) in msg and key in msg and f"did you mean {nearest}" in msg and "\n" not in msg


def test_method_specific_keys_belong_to_their_method(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: dino\naugment: {shared_crop: true}\n")  # a SimCLR-only view option
    with pytest.raises(UserError, match="augment.shared_crop"):
        resolve_config(None, str(f))
    f.write_text("method: simclr\naugment: {shared_crop: true}\n")
    assert resolve_config(None, str(f))["augment"]["shared_crop"] is True


@pytest.mark.parametrize("override, pattern", [
    ("trainer.max_steps=abc", r"trainer.max_steps='abc': expected -1 \(no limit\) or a positive integer"),
    ("trainer.max_steps=0", r"trainer.max_steps=0"),
    ("optim.lr=.nan", r"optim.lr=nan: must be a finite number"),
    ("optim.lr=-1", r"optim.lr=-1: must be > 0"),
    ("data.batch_size=-1", r"data.batch_size=-1: must be >= 1"),
    ("data.image_size=0", r"data.image_size=0: must be >= 8"),
    ("data.resize=stretch", r"data.resize='stretch': expected one of letterbox, bucket"),
    ("model.freeze_bn_stats=maybe", r"model.freeze_bn_stats='maybe': expected true or false"),
    ("mae.mask_ratio=1.5", r"mae.mask_ratio=1.5: must be < 1.0"),
    ("data.val_fraction=1", r"data.val_fraction=1: must be < 1.0"),
    ("trainr.max_steps=3", r"unknown key 'trainr'; did you mean 'trainer'"),
    ("data", r"expected key=value"),
    ("data=3", r"data is a section"),
])
def test_bad_override_values_are_one_line_errors(override, pattern):
    with pytest.raises(UserError, match=pattern) as e:
        resolve_config("mae", overrides=[override])
    assert "\n" not in str(e.value)


def test_wrong_types_in_a_file_are_errors_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: mae\ntrainer: {max_steps: abc}\n")
    with pytest.raises(UserError, match=r"c.yaml: trainer.max_steps='abc'"):
        resolve_config(None, str(f))
    f.write_text("method: mae\ndata: 3\n")
    with pytest.raises(UserError, match=r"c.yaml: data must be a mapping"):
        resolve_config(None, str(f))


def test_overrides_reach_method_keys_the_preset_leaves_out_and_free_dicts():
    cfg = resolve_config("mae", overrides=["mae.decoder_heads=4", "model.kwargs.depth=6", "model.kwargs={}"])
    assert cfg["mae"]["decoder_heads"] == 4 and cfg["model"]["kwargs"] == {}
    cfg = resolve_config("mae", overrides=["model.kwargs.depth=6"])
    assert cfg["model"]["kwargs"]["depth"] == 6


def test_method_may_come_from_the_preset_but_must_agree():
    a = resolve_config(None, "mae_pilot")
    assert a["method"] == "mae" and a == resolve_config("mae", "mae_pilot")
    with pytest.raises(UserError, match="this config is for method 'mae', not 'simclr'"):
        resolve_config("simclr", "mae_pilot")


def test_neither_method_nor_config_runs_the_recommended_recipe(monkeypatch):
    from radpretrain.pretrain.config import RECOMMENDED, recommended_preset

    assert recommended_preset(cuda_available=False) == "recommended_cpu"
    assert recommended_preset(cuda_available=True) == "recommended_gpu"
    assert recommended_preset(["trainer.accelerator=cpu"], cuda_available=True) == "recommended_cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = resolve_config(None, None, ["trainer.max_steps=5"])
    assert cfg == resolve_config(None, RECOMMENDED["cpu"], ["trainer.max_steps=5"])
    assert cfg["method"] == "simclr" and cfg["model"]["freeze_bn_stats"] is True and cfg["data"]["image_size"] == 128
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    gpu = resolve_config(None, None)
    assert gpu["method"] == "simclr" and gpu["data"]["image_size"] == 224 and gpu["model"]["freeze_bn_stats"] is True
    # the two variants are one recipe: same method, start weights, objective and views
    for section in ("simclr", "augment"):
        assert gpu[section] == cfg[section]
    assert gpu["model"]["backbone"] == cfg["model"]["backbone"] and gpu["model"]["pretrained"] == cfg["model"]["pretrained"]


def test_engine_defaults_come_from_the_sections():
    assert DEFAULTS["trainer"]["max_steps"] == -1 and DEFAULTS["data"]["image_size"] == 64
    assert DEFAULTS["optim"]["betas"] == [0.9, 0.95] and DEFAULTS["model"]["kwargs"] == {}


def test_a_schema_rejects_a_method_section_that_replaces_an_engine_one():
    @dataclass
    class NotModel:
        x: int = 1

    class Bad:
        config_sections = {"model": NotModel}

    with pytest.raises(TypeError, match="must extend ModelSection"):
        method_schema(Bad)
    schema = method_schema(get_method("genesis"))
    check_config({"model": {"decoder_norm": "batch", "backbone": "resnet18"}}, schema, "x")


def test_generic_schema_checks_lists_literals_and_custom_rules():
    @dataclass
    class S:
        pair: tuple[float, float] = field(default=(0.1, 0.2), metadata={"ge": 0.0, "le": 1.0})
        odd: int = field(default=1, metadata={"check": lambda v: None if v % 2 else "must be odd"})

    schema = {"s": S}
    check_config({"s": {"pair": [0.0, 1.0], "odd": 3}}, schema, "f")
    with pytest.raises(UserError, match=r"f: s.pair=\[0.0, 2.0\]: must be <= 1.0"):
        check_config({"s": {"pair": [0.0, 2.0]}}, schema, "f")
    with pytest.raises(UserError, match=r"s.pair=\[0.1\]: expected a list of 2"):
        check_config({"s": {"pair": [0.1]}}, schema, "f")
    with pytest.raises(UserError, match="must be odd"):
        apply_overrides({"s": {"odd": 1}}, ["s.odd=2"], schema=schema)
    with pytest.raises(UserError, match="true or false|an integer"):
        apply_overrides({"s": {"odd": 1}}, ["s.odd=true"], schema=schema)  # a bool is not an int


def test_evaluate_options_are_checked():
    assert parse_options(["n_boot=20", "linear.C=[0.1,1]"])["linear"]["C"] == [0.1, 1]
    with pytest.raises(UserError, match=r"n_boot='abc': expected an integer"):
        parse_options(["n_boot=abc"])
    with pytest.raises(UserError, match=r"unknown key 'finetune.epoch'; did you mean 'epochs'"):
        parse_options(["finetune.epoch=3"])
    with pytest.raises(UserError, match=r"val_fraction='half': expected one of same, full"):
        parse_options(["val_fraction=half"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "ds", n_patients=8, images_per_patient=2)


def test_cli_overrides_anywhere_and_errors_before_anything_is_written(toy, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", "trainer.max_steps=abc", "--config", "mae_pilot", "--data", str(toy), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.max_steps='abc'" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()  # nothing written
    code = main(["pretrain", "trainer.max_steps=2", "--config", "mae_pilot", "data.image_size=32", "--data", str(toy),
                 "model.backbone=vit_tiny", "model.patch_size=8", "model.pretrained=none", "mae.decoder_dim=32",
                 "mae.decoder_depth=1", "mae.decoder_heads=2", "--out", str(run), "data.batch_size=4",
                 "data.num_workers=0", "trainer.enable_progress_bar=false", "previews.every_n_epochs=0",
                 "trainer.cpu_threads=1"])
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "mae" and saved["trainer"]["max_steps"] == 2 and saved["data"]["val_fraction"] == 0.2


def test_evaluate_bad_option_is_one_line(toy, tmp_path, capsys):
    code = main(["evaluate", "--data", str(toy), "--target", "label", "--init", "scratch", "n_boot=abc",
                 "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and "n_boot='abc'" in err and len(err.strip().splitlines()) == 1
