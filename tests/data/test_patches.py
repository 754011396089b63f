"""``radpretrain patches``: synthetic CT volumes with spheres planted at known world points, in
MetaImage, NIfTI and DICOM, with a non-trivial origin, anisotropic spacing and flipped/permuted/
oblique direction matrices.  Patch centres must land on the spheres; the store must be a normal one."""

import json

import numpy as np
import pandas as pd
import pytest

from radpretrain.cli import main
from radpretrain.data.patches import (
    CANDIDATE_COLUMN, EXTRA_COLUMNS, REJECTS_FILE, SCAN_COLUMN, fp_weight, make_patch_store, negative_sample,
    plane_axes, read_candidates, sample_plane,
)
from radpretrain.data.store import MANIFEST_COLUMNS, Store
from radpretrain.synthetic.ct import (
    Chest, Lung, Nodule, nodule_mask, patch_reach_mm, render_hu, world_box, write_dicom_series, write_mhd,
    write_nifti,
)
from radpretrain.data.volumes import Geometry, Volume

from .conftest import TEST_KEY

KEY = bytes.fromhex(TEST_KEY)
SIZE = 16
SHAPE = (64, 56, 30)
SPACING = (0.8, 1.1, 2.0)
FLIP_PERMUTE = np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]], float)  # axes i -> +y, j -> -x, k -> -z (det -1)
_a = np.deg2rad(25)
OBLIQUE = np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]]) @ np.array(
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # a cyclic permutation, then rotated 25 degrees about z
UIDS = {"mhd": "1.3.6.1.4.1.9328.50.1.111", "nifti": "1.3.6.1.4.1.9328.50.1.222",
        "dicom": "1.3.6.1.4.1.9328.50.1.333"}
BROKEN_UID = "1.3.6.1.4.1.9328.50.1.444"
MISSING_UID = "1.3.6.1.4.1.9328.50.1.555"
PATIENT, PATIENT_NAME = "LIDC-TEST-0042", "PLANTED^NAME"


def _chest(geom: Geometry) -> Chest:
    """Two nodules and three negatives at fixed offsets (mm, not on the voxel grid) from the volume's centre."""
    lo, hi = world_box(geom)
    c, ext = (lo + hi) / 2, hi - lo
    nodules = [Nodule(c + [-12.3, -10.1, -13.7], 4.5, 60.0), Nodule(c + [11.9, 9.6, 12.2], 4.0, 40.0)]
    negatives = c + np.array([[12.1, -11.8, -12.4], [-12.2, 12.3, 11.6], [0.4, 0.3, -0.6]])
    return Chest(c[:2], 0.8 * ext[:2], [Lung(c, 0.7 * ext)], [], nodules, negatives, np.zeros(3, bool))


def _geometries():
    return {"mhd": Geometry(SHAPE, SPACING, (-123.4, 56.7, -301.2), FLIP_PERMUTE),
            "nifti": Geometry(SHAPE, SPACING, (40.25, -88.5, 12.75), OBLIQUE),
            "dicom": Geometry(SHAPE, SPACING, (-123.4, 56.7, -301.2), FLIP_PERMUTE)}


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctset")
    vols = root / "volumes"
    rows, truth = [], {}
    for fmt, geom in _geometries().items():
        chest = _chest(geom)
        hu = render_hu(geom, chest, rng=None)
        uid = UIDS[fmt]
        if fmt == "mhd":
            write_mhd(vols / f"{uid}.mhd", hu, geom)
        elif fmt == "nifti":
            write_nifti(vols / "nii" / f"{uid}.nii.gz", hu, geom)
        else:
            write_dicom_series(vols / "dcm" / "series", hu, geom, series_uid=uid, study_uid=uid + ".7",
                               patient_id=PATIENT, patient_name=PATIENT_NAME)
        truth[uid] = (geom, chest)
        rows += [(uid, *n.center, 1) for n in chest.nodules] + [(uid, *p, 0) for p in chest.negatives]
    # a volume whose voxels are missing (header fine, .raw truncated)
    write_mhd(vols / f"{BROKEN_UID}.mhd", np.zeros(SHAPE, np.float32), _geometries()["mhd"])
    raw = vols / f"{BROKEN_UID}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    geom = _geometries()["mhd"]
    lo, hi = world_box(geom)
    rows.append((BROKEN_UID, *((lo + hi) / 2), 1))
    rows.append((UIDS["mhd"], hi[0] + 30.0, 0.0, 0.0, 0))   # outside its volume
    rows.append((MISSING_UID, 1.0, 2.0, 3.0, 0))              # no such volume
    lines = ["seriesuid,coordX,coordY,coordZ,class"] + [f"{u},{x:.6f},{y:.6f},{z:.6f},{c}" for u, x, y, z, c in rows]
    lines.append(f"{UIDS['mhd']},abc,1,2,0")                  # invalid row
    (root / "candidates.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "volumes": vols, "csv": root / "candidates.csv", "truth": truth, "n_rows": len(lines) - 1}


@pytest.fixture(scope="module")
def stores(ct_set, tmp_path_factory):
    out = {}
    for planes in ("axial", "three", "random"):
        root = tmp_path_factory.mktemp("patches") / planes
        summary = make_patch_store([ct_set["volumes"]], ct_set["csv"], root, size=SIZE, planes=planes,
                                   random_planes=2, key=KEY, progress=False, body_part="chest")
        out[planes] = (root, summary)
    return out


def _centroid_offset_px(img: np.ndarray) -> np.ndarray:
    x = img.astype(float)
    border = np.r_[x[0], x[-1], x[:, 0], x[:, -1]]
    w = np.clip(x - np.median(border) - 3, 0, None)
    r, c = np.indices(x.shape)
    m = (x.shape[0] - 1) / 2
    return np.array([(w * r).sum() / w.sum() - m, (w * c).sum() / w.sum() - m])


@pytest.mark.parametrize("planes", ["axial", "three", "random"])
def test_patch_centres_land_on_the_planted_spheres(stores, planes):
    root, summary = stores[planes]
    store = Store(root)
    img = store.images
    pos = np.flatnonzero(img["label"].to_numpy() == 1)
    per_cand = {"axial": 1, "three": 3, "random": 2}[planes]
    assert len(pos) == 6 * per_cand  # 2 nodules in each of the 3 readable volumes
    assert set(img.loc[pos, "source_format"]) == {"mhd", "nifti", "dicom"}
    half_voxel = 0.5 * min(SPACING)
    m = SIZE // 2
    for i in pos:
        patch = store.read(int(i))
        off_mm = np.hypot(*_centroid_offset_px(patch)) * min(SPACING)  # patch pixels are min(SPACING) apart
        assert off_mm < half_voxel, (img.loc[i, "source_format"], img.loc[i, "plane"], off_mm)
        # the middle pixels are inside the sphere: nodule HU (40..60), far above lung (-850)
        centre = patch[m - 1 : m + 1, m - 1 : m + 1].astype(float)
        assert centre.min() > (0 + 1000) / 2400 * 255
    # negatives of the clean volumes show lung only at their centre
    neg = np.flatnonzero(img["label"].to_numpy() == 0)
    for i in neg:
        assert store.read(int(i))[m - 1 : m + 1, m - 1 : m + 1].max() < (-600 + 1000) / 2400 * 255


def test_patches_sample_the_exact_world_point(ct_set):
    # planes through each nodule centre, straight from the volume readers, at a finer spacing
    from radpretrain.data.volumes import find_volumes

    found, _ = find_volumes([ct_set["volumes"]])
    for uid in UIDS.values():
        geom, chest = ct_set["truth"][uid]
        vol = found[uid].open()
        for nod in chest.nodules:
            for name, u, v in plane_axes("three"):
                hu, n_out = sample_plane(vol, nod.center, u, v, 31, 0.5)
                assert n_out == 0
                assert hu[15, 15] == pytest.approx(nod.hu, abs=1.0)  # odd size: pixel 15 is the centre itself
                # the sphere's edge is 4-4.5 mm away, the patch's edges 7.5 mm: lung there
                assert hu[15, 0] < -800 and hu[15, 30] < -800 and hu[0, 15] < -800 and hu[30, 15] < -800
                w = np.clip(hu + 850.0, 0, None)  # what rises above the lung
                r, c = np.indices(hu.shape)
                off = np.hypot((w * r).sum() / w.sum() - 15, (w * c).sum() / w.sum() - 15) * 0.5
                assert off < 0.5 * min(SPACING)


def test_negatives_never_show_a_nodule(ct_set):
    spacing = min(SPACING)
    for uid, (geom, chest) in ct_set["truth"].items():
        # the planted negatives are clear of every nodule by more than a patch reaches (+ one voxel)
        reach = patch_reach_mm(SIZE, spacing) + max(SPACING)
        for p in chest.negatives:
            for n in chest.nodules:
                assert np.linalg.norm(p - n.center) > n.radius + reach
        mask = Volume(nodule_mask(geom, chest.nodules), geom)
        rng = np.random.default_rng(0)
        for p in chest.negatives:
            for _, u, v in plane_axes("three") + plane_axes("random", 4, rng):
                assert sample_plane(mask, p, u, v, SIZE, spacing, fill=0.0)[0].max() == 0.0
        for n in chest.nodules:  # and the mask test would see one
            assert sample_plane(mask, n.center, *plane_axes("axial")[0][1:], SIZE, spacing, fill=0.0)[0].max() == 1.0


def test_store_is_a_normal_store_that_info_and_split_accept(stores, ct_set, deid_key, capsys):
    root, summary = stores["three"]
    store = Store(root)
    man = store.manifest
    assert list(man.columns) == MANIFEST_COLUMNS + EXTRA_COLUMNS
    assert store.label_columns[0] == "label"  # split stratifies by the first label column
    img = store.images
    assert (img[SCAN_COLUMN] == img["series_id"]).all()
    planes = img.groupby(CANDIDATE_COLUMN)["plane"].apply(lambda p: tuple(sorted(p)))
    assert set(planes) == {("axial", "coronal", "sagittal")}
    assert img.groupby(SCAN_COLUMN)["patient_id"].nunique().eq(1).all() and img[SCAN_COLUMN].nunique() == 3
    assert (img[["height", "width"]] == SIZE).all().all() and (img["modality"] == "CT").all()
    dicom = img[img["source_format"] == "dicom"]
    assert (dicom["body_part"] == "chest").all() and (dicom["sex"] == "F").all()
    meta = json.loads((root / "store.json").read_text())
    assert meta["kind"] == "ct-candidate-patches" and meta["max_size"] == SIZE and meta["id_columns"] == ["candidate_id", "scan_id"]
    assert main(["info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ingested"] == len(img) and info["quarantined"] == {"invalid_row": 1, "outside_volume": 1,
                                                                    "unknown_series": 1, "unreadable_volume": 1}
    assert info["by_label"]["label"] == {"0": 27, "1": 18} and info["id_columns"] == {"candidate_id": 15, "scan_id": 3}
    assert main(["info", str(root)]) == 0 and (root / "sample_grid.png").is_file()
    assert main(["split", str(root), "--folds", "3", "--seed", "1"]) == 0
    sp = pd.read_parquet(root / "splits.parquet").merge(img[["image_id", SCAN_COLUMN]], on="image_id")
    assert sp.groupby(SCAN_COLUMN)["fold"].nunique().eq(1).all()
    assert sp.groupby(SCAN_COLUMN)["split"].nunique().eq(1).all()
    assert sp["fold"].nunique() == 3


def test_rejected_candidates_are_listed_by_row_with_a_reason(stores, ct_set):
    root, summary = stores["axial"]
    rej = pd.read_csv(root / REJECTS_FILE, dtype=str, keep_default_na=False)
    n = ct_set["n_rows"]
    assert rej.set_index("row")["reason"].to_dict() == {
        "16": "unreadable_volume", "17": "outside_volume", "18": "unknown_series", str(n): "invalid_row"}
    assert rej.set_index("row").loc["16", "detail"] == "truncated"
    c = summary["candidates"]
    assert c["rows"] == n and c["rejected"] == {"invalid_row": 1, "unknown_series": 1, "unreadable_volume": 1,
                                                "outside_volume": 1}
    assert c["kept"] == {"positives": 6, "negatives": 9} and c["patches"] == 15
    assert summary["inputs"] == summary["ingested"] + sum(summary["quarantined"].values())
    assert summary["volumes"]["found"] == 4 and summary["volumes"]["unreadable"] == {"truncated": 1}
    q = Store(root).manifest.query("status == 'quarantined'")
    assert sorted(q["reason"]) == ["invalid_row", "outside_volume", "unknown_series", "unreadable_volume"]
    text = (root / REJECTS_FILE).read_text()
    assert not any(uid in text for uid in [*UIDS.values(), BROKEN_UID, MISSING_UID])


def test_no_identifier_reaches_the_store_or_the_console(ct_set, tmp_path, deid_key, capsys):
    out = tmp_path / "store"
    assert main(["patches", str(ct_set["volumes"]), "--candidates", str(ct_set["csv"]), "--out", str(out),
                 "--size", str(SIZE)]) == 0
    printed = capsys.readouterr()
    planted = [*UIDS.values(), BROKEN_UID, MISSING_UID, UIDS["dicom"] + ".7", PATIENT, PATIENT_NAME, "PLANTED",
               str(ct_set["volumes"])]
    texts = [printed.out, printed.err] + [f.read_text() for f in out.rglob("*") if f.suffix in (".json", ".csv")]
    man = Store(out).manifest
    texts += [" ".join(map(str, man[c].tolist())) for c in man.columns]
    for t in texts:
        assert not any(p in t for p in planted)
    assert "rejected unknown_series: 1" in printed.out


def test_neg_per_pos_subsamples_deterministically_and_keeps_full_counts(ct_set, tmp_path):
    def build(name, seed):
        root = tmp_path / name
        s = make_patch_store([ct_set["volumes"]], ct_set["csv"], root, size=SIZE, neg_per_pos=1, seed=seed, key=KEY,
                             progress=False)
        return Store(root), s

    a, sa = build("a", 0)
    b, _ = build("b", 0)
    assert list(a.manifest["image_id"]) == list(b.manifest["image_id"])
    c = sa["candidates"]
    # 7 positives were usable when the negatives were drawn (the truncated volume's header was fine);
    # its voxels then failed, so 6 are left and the counts say so
    assert c["usable"] == {"positives": 6, "negatives": 9} and c["kept"] == {"positives": 6, "negatives": 7}
    assert c["negatives_subsampled_out"] == 2 and c["neg_per_pos"] == 1
    assert len(a.images) == 13 and (a.images["label"] == 0).sum() == 7
    meta = json.loads((a.root / "store.json").read_text())
    assert meta["candidates"]["kept"]["negatives"] == 7 and meta["patches"]["neg_per_pos"] == 1
    assert fp_weight(meta) == pytest.approx(9 / 7)
    picks = {tuple(sorted(build(f"s{s}", s)[0].images.query("label == 0")[CANDIDATE_COLUMN])) for s in range(6)}
    assert len(picks) > 1  # the seed decides which negatives
    # the sampler itself: exact count, positives always kept
    is_neg = np.array([True] * 50 + [False] * 5)
    keep = negative_sample(is_neg, 5, 3, seed=4)
    assert keep[~is_neg].all() and keep[is_neg].sum() == 15
    assert (negative_sample(is_neg, 5, 3, seed=4) == keep).all() and negative_sample(is_neg, 5, None, 0).all()


def test_read_candidates_and_user_errors(ct_set, tmp_path, deid_key, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,klass\n1.2,0,0,1\n")
    assert main(["patches", str(ct_set["volumes"]), "--candidates", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "coordZ" in err and "class" in err and len(err.strip().splitlines()) == 1
    ok = tmp_path / "ok.csv"
    ok.write_text("SeriesUID,coordx,coordY,coordZ,class\n1.2,0,0,0,1\n1.2,0,0,0,0.5\n1.2,,0,0,0\n")
    df = read_candidates(ok)
    assert list(df["problem"]) == ["", "invalid_row", "invalid_row"] and list(df["row"]) == [1, 2, 3]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["patches", str(empty), "--candidates", str(ct_set["csv"]), "--out", str(tmp_path / "o2")]) == 2
    assert "no CT volumes found" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["patches", str(ct_set["volumes"]), "--candidates", str(ct_set["csv"]), "--out",
                 str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    inside = ct_set["volumes"] / "store"
    assert main(["patches", str(ct_set["volumes"]), "--candidates", str(ct_set["csv"]), "--out", str(inside)]) == 2
    assert "must not be inside the volumes folder" in capsys.readouterr().err and not inside.exists()


def test_synth_luna16_writes_volumes_and_candidates(tmp_path, deid_key, capsys):
    out = tmp_path / "luna"
    assert main(["synth", str(out), "--kind", "luna16", "--patients", "1", "--seed", "2"]) == 0
    assert "1 CT volumes" in capsys.readouterr().out
    cands = pd.read_csv(out / "candidates.csv")
    truth = json.loads((out / ".synth" / "truth.json").read_text())
    assert list(cands.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert (cands["class"] == 1).sum() == 4 and len(list((out / "subset0").glob("*.mhd"))) == 1
    assert truth["summary"]["planted_rejects"] == {"outside_volume": 1, "unknown_series": 1}
    assert main(["synth", str(out), "--kind", "luna16", "--patients", "1"]) == 2  # not empty
