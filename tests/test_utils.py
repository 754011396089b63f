"""Shared helpers: the idle-core count behind ``trainer.cpu_threads=auto``."""

import os
import sys

import pytest

from radpretrain import utils


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_idle_cpus_is_a_share_of_the_machine():
    idle = utils.idle_cpus(0.2)
    assert idle is not None and 0.0 <= idle <= os.cpu_count() + 1e-6


def test_auto_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cases = {0.1: 1, 0.9: 1, 1.7: 1, 1.85: 2, 3.95: 4, 12.0: 4, None: 4}  # a core counts when >= 80 % idle
    for idle, want in cases.items():
        monkeypatch.setattr(utils, "idle_cpus", lambda window=0.5, v=idle: v)
        assert utils.auto_cpu_threads() == (want, idle), idle
