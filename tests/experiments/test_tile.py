"""The tiling CLI's flags: what each layout needs is asked for by name, not met with a traceback."""

import pytest

from experiments import tile


@pytest.mark.parametrize("argv, message", [
    (["--out=s", "--layout=camelyon"], "--layout=camelyon needs --csv"),
    (["--out=s", "--layout=csv"], "--layout=csv needs --csv"),
    (["--out=s", "--layout=panda"], "--layout=panda needs --data_dir"),
    (["--out=s", "--layout=synthetic"], "--layout=synthetic needs --data_dir"),
    (["--out=s", "--layout=synthetic", "--data_dir=d", "--side=512"], "--side: '512': expected two integers"),
])
def test_missing_or_bad_flags_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        tile.parse_flags(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_parse():
    config = tile.parse_flags(["--out=s", "--layout=synthetic", "--data_dir=d", "--side=64,96"])
    assert config.side == (64, 96) and config.data_dir == "d"
    assert tile.parse_flags(["--out=s", "--bench"]).bench
