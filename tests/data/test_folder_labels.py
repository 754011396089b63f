"""Folder names as labels: which names may be identities (``deid.folder_name_looks_identifying``)."""

import pytest
from pydicom.dataset import Dataset

from radpretrain.data.deid import folder_name_in_header, folder_name_looks_identifying, header_identity_tokens


@pytest.mark.parametrize("name", [
    "0", "4", "KL0", "KL3", "NORMAL", "PNEUMONIA", "fracture", "no_fracture", "Viral Pneumonia", "Lung_Opacity",
    "COVID-19", "NO FINDING", "Pleural Effusion", "grade 2", "Grade II", "class_10", "XR_ELBOW", "benign", "c0",
])
def test_class_names_are_not_identifying(name):
    assert not folder_name_looks_identifying(name)


@pytest.mark.parametrize("name", [
    "DOE JOHN", "SMITH ANNA", "Anna Smith", "DOE_J", "van der Berg Jan", "Roe, Richard", "DOE^JANE", "O'Brien",
    "Müller Hans", "PHI000123_SMITH", "2021-03-04", "20210304", "03.04.21", "Mar 2021", "P001", "0042", "sub-01",
    "patient7", "case_12", "12345", "A" * 33,
])
def test_names_dates_and_ids_are_identifying(name):
    assert folder_name_looks_identifying(name)


def test_folder_names_found_in_a_dicom_header():
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "ROE^RICHARD", "PHI-123456", "A998877"
    ds.InstitutionName, ds.StudyDate = "St Elsewhere Hospital", "20210304"
    ids = header_identity_tokens(ds)
    for name in ("Roe", "ROE RICHARD", "richard_x", "123456", "A998877", "Elsewhere", "20210304"):
        assert folder_name_in_header(name, ids), name
    for name in ("NORMAL", "0", "KL3", "fracture", "R"):
        assert not folder_name_in_header(name, ids), name
