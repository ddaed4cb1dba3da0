"""Outputs on disk: atomic publishing, one writer per directory, caches built once."""

import os
import subprocess
import sys
import threading
import time

import pytest

from qlora_kit.errors import UserError
from qlora_kit.files import build_once, exclusive, remove_leftovers, staged_dir


def test_a_failed_build_leaves_the_previous_directory_as_it_was(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "a").write_text("second, half written")
        raise RuntimeError("killed halfway")
    assert (target / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with staged_dir(target) as tmp:
        (tmp / "a").write_text("third")
    assert (target / "a").read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # like mkdir, not mkdtemp's 0700


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "out"
    for name in (".out.tmp-abc", ".out.old-def", ".other.tmp-x"):
        (tmp_path / name).mkdir()
    remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x"]


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_a_dead_holder_blocks_nothing(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qlora_kit.files import exclusive\n"
                               f"with exclusive({str(target)!r}, 'x'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"'output_dir': .*run is in use by another qlora-kit process \(pid "
                                            rf"{holder.pid}\)"), exclusive(target, "'output_dir'"):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with exclusive(target, "'output_dir'"):  # the kernel dropped the dead process's lock
        assert (tmp_path / ".run.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".run.lock").exists()  # released and removed


def test_a_cache_entry_is_built_once_while_others_wait(tmp_path):
    builds, results = [], []

    def build(out):
        builds.append(out)
        time.sleep(0.5)
        (out / "model").write_text("built")

    threads = [threading.Thread(target=lambda: results.append(build_once(tmp_path / "entry", build)))
               for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == [tmp_path / "entry"] * 3
    assert (tmp_path / "entry" / "model").read_text() == "built"
