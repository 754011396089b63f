"""Synthetic data: the test beds of every stage, never patient data.

- :mod:`.archive` -- a PACS-export-like archive of real DICOM files with planted fake PHI, PNG/JPEG
  exports, broken files and a labels CSV (``radpretrain synth``);
- :mod:`.anatomy` -- the procedural radiographs, CT and MR slices it draws;
- :mod:`.ct` -- chest CT volumes with planted nodules and a LUNA16-like candidate list
  (``radpretrain synth --kind luna16``, for ``radpretrain patches``);
- :mod:`.toy` -- a tiny dataset store written directly, in well under a second, for unit tests;
- :mod:`.cli` -- the ``radpretrain synth`` command.
"""
