"""CLI conventions: --version, -h on every command."""

from __future__ import annotations

import pytest

from facemark import __version__
from facemark.cli import run


def test_version_flag_prints_the_package_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"facemark {__version__}"


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["export"], ["runtime"], ["runtime", "predict"],
                                     ["runtime", "video"], ["bench"]])
def test_short_help_works_everywhere(command, capsys):
    assert run([*command, "-h"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_detect_takes_bgr_rgb_gray_pil_and_paths_alike():
    import cv2
    import numpy as np
    from conftest import SAMPLES
    from PIL import Image

    from facemark.errors import ImageError
    from facemark.imageio import image_to_gray, read_image

    path = SAMPLES / "2009_004587.jpg"
    bgr = read_image(path)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    reference = image_to_gray(bgr)
    assert np.array_equal(image_to_gray(rgb, color="rgb"), reference)
    assert np.array_equal(image_to_gray(path), reference) and np.array_equal(image_to_gray(str(path)), reference)
    assert np.abs(image_to_gray(Image.fromarray(rgb)).astype(int) - reference).max() <= 1
    assert np.array_equal(image_to_gray(reference, color="gray"), reference)
    # An RGB array read as BGR is a different picture: the red and blue channels swap weights.
    assert not np.array_equal(image_to_gray(rgb), reference)
    with pytest.raises(ImageError, match="color 'hsv'"):
        image_to_gray(bgr, color="hsv")
    with pytest.raises(ImageError, match="color='gray'"):
        image_to_gray(bgr, color="gray")
