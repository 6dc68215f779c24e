"""beit.machine: the ISA level and CPU model read from /proc/cpuinfo text (given here, not this machine's)."""

from __future__ import annotations

import pytest

from beit import machine

EPYC = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2
"""


@pytest.mark.parametrize("flags,level", [
    ("avx avx2 fma", "AVX2"),
    ("avx2 avx512f avx512bw avx512vl", "AVX-512"),
    ("avx2 avx512f avx512_bf16", "AVX-512-BF16"),
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "AMX"),
])
def test_isa_level_from_flags(flags, level):
    assert machine.isa_level(machine.cpu_flags(f"flags\t: {flags}\n")) == level


def test_without_cpuinfo_the_torch_level_is_used():
    assert machine.isa_level(set(), torch_capability="AVX512") == "AVX-512"
    assert machine.isa_level(set(), torch_capability="DEFAULT") == "DEFAULT"


def test_cpu_model_and_description():
    assert machine.cpu_model(EPYC) == "AMD EPYC 7B13"
    assert machine.isa_level(machine.cpu_flags(EPYC)) == "AVX2"
    line = machine.describe()
    assert "threads" in line and "torch " in line and machine.isa_level() in line
    assert set(machine.info()) >= {"cpu", "isa", "threads", "torch", "device"}


def test_isa_limits_are_named_in_the_description(monkeypatch):
    for var in machine.ISA_LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert machine.isa_limits() == {} and "limited by" not in machine.describe()
    assert "isa_limits" not in machine.info()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert machine.isa_limits() == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert machine.describe().count("limited by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2") == 1
    assert machine.info()["isa_limits"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
