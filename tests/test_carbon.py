from __future__ import annotations

import math

import pytest

from llamaworks.carbon import TABLE_15, carbon_command, energy_mwh, run_summary, tco2eq
from llamaworks.cli import main


@pytest.mark.parametrize("name", list(TABLE_15))
def test_table_15_reproduced(name):
    # Section 6: MWh = GPU-h x 400 W x PUE 1.1 / 1e6; tCO2eq = MWh x 0.385.
    row = TABLE_15[name]
    mwh = energy_mwh(row.gpu_hours)
    assert mwh == pytest.approx(row.gpu_hours * 400 * 1.1 / 1e6)
    # The paper truncates MWh (65B: 449.84 is printed 449) and rounds tCO2eq.
    assert math.floor(mwh) == row.mwh
    assert abs(mwh - row.mwh) < 1
    assert round(tco2eq(mwh)) == row.tco2eq


def test_table_15_values():
    assert [r.gpu_hours for r in TABLE_15.values()] == [82_432, 135_168, 530_432, 1_022_362]
    assert [r.mwh for r in TABLE_15.values()] == [36, 59, 233, 449]
    assert [r.tco2eq for r in TABLE_15.values()] == [14, 23, 90, 173]
    assert energy_mwh(82_432) == pytest.approx(36.27, abs=0.01)
    assert tco2eq(36.27) == pytest.approx(13.96, abs=0.01)


def test_run_summary_cpu_run():
    s = run_summary(2.0, power_w=65)  # e.g. a CPU run: 2 device-hours at 65 W
    assert s["energy_kwh"] == pytest.approx(2.0 * 65 * 1.1 / 1e3)
    assert s["energy_mwh"] == pytest.approx(s["energy_kwh"] / 1e3)
    assert s["kgco2eq"] == pytest.approx(s["energy_mwh"] * 0.385 * 1e3)
    assert s["tco2eq"] == pytest.approx(s["kgco2eq"] / 1e3)
    assert (s["gpu_hours"], s["power_w"], s["pue"], s["intensity"]) == (2.0, 65, 1.1, 0.385)
    assert run_summary(0, 400)["energy_mwh"] == 0


@pytest.mark.parametrize("args, match", [
    ((-1.0,), "--gpu-hours"),
    ((10.0, 0.0), "--power-w"),
    ((10.0, 400, 0.9), "--pue"),
])
def test_invalid_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        energy_mwh(*args)
    with pytest.raises(ValueError, match="--intensity"):
        tco2eq(1.0, -0.1)


def test_carbon_command_table(capsys):
    assert carbon_command() == 0
    out = capsys.readouterr().out
    for name, figures in [("LLaMA-7B", ("36.27", "13.96")), ("LLaMA-13B", ("59.47", "22.90")),
                          ("LLaMA-33B", ("233.39", "89.86")), ("LLaMA-65B", ("449.84", "173.19"))]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert all(f in line for f in figures) and line.endswith("yes"), line
    assert "NO" not in out


def test_cli_carbon_one_run(capsys):
    assert main(["carbon", "--gpu-hours", "1022362"]) == 0
    out = capsys.readouterr().out
    assert "449.839 MWh" in out and "173.188 tCO2eq" in out
    assert main(["carbon", "--gpu-hours", "100", "--pue", "0.5"]) == 2
    assert "--pue" in capsys.readouterr().err
