"""kernels/*_drivers.py are what kernels/specialise.py renders: run it after editing the template."""

from __future__ import annotations

import pytest

from gpt2cli.kernels import specialise


@pytest.mark.parametrize("path", list(specialise.render()), ids=lambda path: path.name)
def test_drivers_are_rendered_from_the_template(path):
    assert path.read_text() == specialise.render()[path], "run: python -m kernels.specialise"
