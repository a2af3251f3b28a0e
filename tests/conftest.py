"""Shared pytest set-up: the `slow` marker, skipped unless `--runslow` is given (`make test-slow`)."""
import os
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('OMP_NUM_THREADS', '1')


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='also run tests marked slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long or environment-heavy test, run only with --runslow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'): return
    skip = pytest.mark.skip(reason='slow test: run with --runslow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)
