import pytest

from bigjax.local.memory import main


@pytest.mark.parametrize("argv,message", [
    (["--side=abc"], "'abc': give positive integers"),
    (["--big", "--modules=4,x"], "'4,x': give positive integers"),
    (["--side=512,1024"], "--side=512,1024: one side without --big"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
