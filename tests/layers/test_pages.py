"""layers.pages: freed buffers back to the OS, and the huge-pages advice only where it would help."""

import logging
import sys

import pytest

from bigjax.layers import pages


@pytest.mark.parametrize("mode, tunables, advised", [
    ("always [madvise] never\n", "", True),  # the kernel's default: glibc must ask
    ("always [madvise] never\n", "glibc.malloc.check=0:glibc.malloc.hugetlb=1", False),  # it does
    ("[always] madvise never\n", "", False),  # every mapping has them already
    ("always madvise [never]\n", "", False),  # none to ask for
    (None, "", False),  # no THP (not Linux)
])
def test_huge_pages_are_advised_only_where_the_tunable_would_help(tmp_path, mode, tunables, advised):
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode)
    hint = pages.huge_pages_hint({"GLIBC_TUNABLES": tunables} if tunables else {}, path)
    assert (hint is not None) == advised
    if advised:
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint


def test_a_spill_store_logs_the_advice_once_per_process(tmp_path, monkeypatch, caplog):
    from bigjax.layers.spill import SpillStore
    monkeypatch.setattr(pages, "huge_pages_hint", lambda: "HINT")
    pages.advise_huge_pages.cache_clear()
    with caplog.at_level(logging.INFO, logger="bigjax.layers.pages"):
        SpillStore(2**20, tmp_path)
        SpillStore(2**20, tmp_path)
    assert [r.getMessage() for r in caplog.records] == ["HINT"]
    pages.advise_huge_pages.cache_clear()


def test_freed_buffers_are_returned_on_glibc():
    assert pages.return_freed_buffers()  # glibc (here and in CI) takes the setting


@pytest.mark.parametrize("argv, tunables, restarted", [
    (["--host_memory=8GiB"], None, "glibc.malloc.hugetlb=1"),
    (["--host_memory", "auto"], "glibc.malloc.check=0", "glibc.malloc.check=0:glibc.malloc.hugetlb=1"),
    (["--host_memory=8GiB"], "glibc.malloc.hugetlb=1", None),  # the restarted process itself
    (["--check", "96", "--budget", "0", "--spill_dir", "D"], None, "glibc.malloc.hugetlb=1"),
    (["--epochs=1"], None, None),  # no host budget: nothing to gain
])
def test_a_command_line_with_a_host_budget_restarts_once_with_huge_pages(tmp_path, argv, tunables,
                                                                        restarted):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    environ = {"HOME": "/h"} | ({} if tunables is None else {"GLIBC_TUNABLES": tunables})
    calls = []
    pages.restart_with_huge_pages(argv, environ, lambda *call: calls.append(call), mode)
    if restarted is None:
        assert calls == []
    else:
        assert calls == [(sys.executable, sys.orig_argv, {"HOME": "/h", "GLIBC_TUNABLES": restarted})]
