"""``python -m bigjax.bench.gpu_check --dry-run``: the GPU readiness table on two CPU devices."""

from bigjax.bench import gpu_check


def test_the_dry_run_writes_every_check_and_passes(tmp_path):
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--dry-run", f"--out={out}"]) == 0
    text = out.read_text()
    for name in gpu_check.ENGINES:
        assert f"| engine {name} = CPU twin |" in text
    assert "| pinned-host staging in use |" in text and "| device peak ≤ predicted |" in text
    assert text.count("| benchmark ") == len(gpu_check.DRY_LINES)
    assert "**NO**" not in text
