"""Fixtures for the ingest tests (opt-in): a fixed de-id key and one small synthetic archive per session."""

from __future__ import annotations

import pytest

TEST_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture
def deid_key(monkeypatch, tmp_path_factory):
    """Every test runs with a known key and a HOME of its own (no key file is ever created in ~)."""
    monkeypatch.setenv("RADPRETRAIN_DEID_KEY", TEST_KEY)
    monkeypatch.delenv("RADPRETRAIN_DEID_KEY_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """An 8-patient synthetic PACS archive (DICOM with planted PHI, exports, broken files, labels)."""
    synth = pytest.importorskip("radpretrain.synthetic.archive")
    out = tmp_path_factory.mktemp("synth") / "archive"
    synth.generate_archive(out, n_patients=8, seed=3)
    return out
