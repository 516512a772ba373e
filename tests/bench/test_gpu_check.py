"""``python -m bigjax.bench.gpu_check --dry-run``: the GPU readiness table on two CPU devices."""

from bigjax.bench import gpu_check


def test_the_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "gpu_check.md"
    gpu_check.main(["--dry-run", f"--out={out}"])
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    for name in ("eager", "compiled", "whole blocks"):  # float32 engines: equal to the CPU twin
        assert rows[f"engine {name} = CPU twin"].endswith("| yes |"), rows
    # bfloat16 host activations: against the same storage on the CPU (0.41 against float32 storage,
    # a random ResNet's roughness, docs/benchmarks.md)
    assert rows["engine bf16 host = CPU, same bf16 storage"].endswith("| yes |"), rows
    assert rows["pinned-host staging in use"].endswith("| yes |")
    assert rows["device peak ≤ predicted"].endswith("| yes |")
    assert sum(k.startswith("benchmark ") for k in rows) == len(gpu_check.DRY_LINES)
