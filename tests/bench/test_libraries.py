"""``python -m bench.libraries``: perf's report by shared object, grouped by library, and
each server's CPU per call split by those shares."""

from __future__ import annotations

import pytest

from bench.libraries import OTHER, Split, library_of, library_shares, table

REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 5K of event 'cpu-clock:pppH'
# Event count (approx.): 10460000000
#
# Overhead  Shared Object
# ........  ..............................................
#
    36.52%  [kernel.kallsyms]
    33.82%  libpython3.11.so.1.0
    10.95%  cygrpc.cpython-311-x86_64-linux-gnu.so
     5.96%  libc.so.6
     3.12%  _pydantic_core.cpython-311-x86_64-linux-gnu.so
     2.60%  loop.cpython-311-x86_64-linux-gnu.so
     2.46%  libsqlite3.so.0.8.6
     2.08%  _message.abi3.so
     0.66%  _asyncio.cpython-311-x86_64-linux-gnu.so
     0.19%  _sqlite3.cpython-311-x86_64-linux-gnu.so
     1.64%  libcrypto.so.3
"""


def test_a_report_s_shared_objects_are_grouped_by_library() -> None:
    shares = library_shares(REPORT)
    assert shares["interpreter (libpython)"] == pytest.approx(0.3382)
    assert shares["kernel"] == pytest.approx(0.3652)
    assert shares["SQLite"] == pytest.approx(0.0246 + 0.0019)
    assert shares["event loop (uvloop, _asyncio)"] == pytest.approx(0.0260 + 0.0066)
    assert shares[OTHER] == pytest.approx(0.0164)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert library_of("libcrypto.so.3") == OTHER


def test_the_table_splits_each_server_s_cpu_per_call_by_its_shares() -> None:
    gateway = Split(1.0, {"interpreter (libpython)": 0.4, "kernel": 0.6})
    floor = Split(0.5, {"interpreter (libpython)": 0.2, "kernel": 0.8})
    assert gateway.ms("interpreter (libpython)") == pytest.approx(0.4)
    lines = table(16, {"gateway": gateway, "durable-floor": floor}).splitlines()
    interpreter = next(line for line in lines if "libpython" in line)
    assert interpreter.split()[-1] == "0.300"  # 0.4 against 0.1 ms
    assert lines[-1].split()[-3:] == ["0.500", "(2.00", "x)"]
