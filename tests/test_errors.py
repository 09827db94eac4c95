"""Library messages name settings by their TrainConfig field; the command line shows its own flags."""
from __future__ import annotations

import pytest

from deltatl.config import TrainConfig
from deltatl.errors import DeltatlError, on_command_line


def test_a_setting_that_is_a_flag_of_the_command_reads_as_the_flag_any_other_as_its_bare_name():
    message = "`drop_path_rate`: no residual branches; lower `lr` (or `alpha`) and see `cv_fold`"
    assert on_command_line(message, {"drop-path-rate", "lr", "alpha"}) == (
        "--drop-path-rate: no residual branches; lower --lr (or --alpha) and see cv_fold")


def test_the_library_names_the_field_a_python_caller_sets():
    with pytest.raises(DeltatlError, match=r"^`momentum` must be in \[0, 1\)$"):
        TrainConfig(momentum=1.0)


def test_the_command_line_names_its_flag(cli, tmp_path):
    result = cli("train", "--momentum", "1", "--out", str(tmp_path / "run"))
    assert result.code == 2 and result.err_lines == ["deltatl: error: --momentum must be in [0, 1)"]
