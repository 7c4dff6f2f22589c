"""Scanner-native input and output: DICOM series and NIfTI volumes in; DICOM SEG, NIfTI masks and volumes out.

Torch-free, and the DICOM / NIfTI libraries (pydicom, highdicom, nibabel: `pip install lggdeploy[dicom]`) are imported
only when a DICOM or NIfTI input is given. `series` reads and checks the sequences and finds their roles,
`intensity` maps scanner units onto the models' 8-bit scale (the one mapping, documented there), `case` assembles a
patient's sequences on the FLAIR grid and runs the Segmenter, `outputs` writes what a PACS and a pipeline read.
"""

EXTRA_HINT = "pip install 'lggdeploy[dicom]' (pydicom, highdicom, nibabel and the JPEG decoder plugins)"


def require_scanner_libraries() -> None:
    """One line, not an ImportError traceback, when the extra is not installed."""
    from lggdeploy.common.errors import LggError

    missing = []
    for module in ("pydicom", "highdicom", "nibabel"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise LggError(f"DICOM / NIfTI input needs {', '.join(missing)}: {EXTRA_HINT}")
