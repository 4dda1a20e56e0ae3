"""Energy and carbon of a training run, as the paper accounts for it (section 6, Table 15).

The paper's formula (after Wu et al. 2022): Wh = GPU-hours x GPU power x PUE, and
tCO2eq = MWh x 0.385. It deliberately uses the US-average carbon intensity and a PUE
of 1.1 for every model, so that runs compare independently of where they happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from llamaworks.args import Arg

__all__ = ["POWER_W", "PUE", "INTENSITY", "TABLE_15", "Table15Row", "energy_mwh", "tco2eq", "run_summary",
           "carbon_command"]

POWER_W = 400.0  # section 6: A100-80GB thermal design power, the figure Table 15 uses
PUE = 1.1  # section 6: power usage effectiveness of the data centre
INTENSITY = 0.385  # section 6: US national average, tCO2eq per MWh


@dataclass(frozen=True)
class Table15Row:
    gpu_hours: float
    mwh: float  # as printed in the paper
    tco2eq: float  # as printed in the paper


# Table 15, the LLaMA rows (A100-80GB, 400 W). The paper's MWh column is the exact value
# truncated (65B: 449.84 -> 449), its tCO2eq column is rounded (65B: 173.19 -> 173).
TABLE_15: dict[str, Table15Row] = {
    "LLaMA-7B": Table15Row(82_432, 36, 14),
    "LLaMA-13B": Table15Row(135_168, 59, 23),
    "LLaMA-33B": Table15Row(530_432, 233, 90),
    "LLaMA-65B": Table15Row(1_022_362, 449, 173),
}


def _check(gpu_hours: float, power_w: float, pue: float) -> None:
    if gpu_hours < 0:
        raise ValueError(f"gpu_hours must be >= 0, got {gpu_hours}; pass the device-hours (--gpu-hours)")
    if power_w <= 0:
        raise ValueError(f"power_w must be > 0, got {power_w}; pass the power draw in watts (--power-w)")
    if pue < 1:
        raise ValueError(f"pue must be >= 1 (facility / IT power), got {pue}; the paper uses 1.1 (--pue)")


def energy_mwh(gpu_hours: float, power_w: float = POWER_W, pue: float = PUE) -> float:
    _check(gpu_hours, power_w, pue)
    return gpu_hours * power_w * pue / 1e6  # Wh -> MWh


def tco2eq(mwh: float, intensity: float = INTENSITY) -> float:
    if mwh < 0 or intensity < 0:
        raise ValueError(f"mwh and intensity must be >= 0, got {mwh} and {intensity} (--intensity)")
    return mwh * intensity


def run_summary(gpu_hours: float, power_w: float, pue: float = PUE, intensity: float = INTENSITY) -> dict:
    # For a CPU run the caller passes device-hours and the CPU's power figure; kWh and kg
    # keep small runs readable where MWh and tonnes would print as zeros.
    mwh = energy_mwh(gpu_hours, power_w, pue)
    t = tco2eq(mwh, intensity)
    return {"gpu_hours": gpu_hours, "power_w": power_w, "pue": pue, "intensity": intensity,
            "energy_mwh": mwh, "energy_kwh": mwh * 1e3, "tco2eq": t, "kgco2eq": t * 1e3}


def format_summary(s: dict, width: int = 32) -> str:
    rows = [("device-hours", f"{s['gpu_hours']:,.1f} x {s['power_w']:g} W x PUE {s['pue']:g}"),
            ("energy", f"{s['energy_mwh']:,.3f} MWh ({s['energy_kwh']:,.1f} kWh)"),
            ("carbon", f"{s['tco2eq']:,.3f} tCO2eq ({s['kgco2eq']:,.1f} kg) at {s['intensity']:g} t/MWh")]
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def table_15(power_w: float = POWER_W, pue: float = PUE, intensity: float = INTENSITY) -> str:
    lines = [f"Table 15 recomputed (section 6): {power_w:g} W x PUE {pue:g}, {intensity:g} tCO2eq/MWh",
             f"{'model':<10} {'GPU-hours':>10} {'MWh':>8} {'paper':>6} {'tCO2eq':>8} {'paper':>6}  agrees"]
    for name, row in TABLE_15.items():
        mwh = energy_mwh(row.gpu_hours, power_w, pue)
        t = tco2eq(mwh, intensity)
        agrees = math.floor(mwh) == row.mwh and round(t) == row.tco2eq  # the paper's rounding, see TABLE_15
        lines.append(f"{name:<10} {row.gpu_hours:>10,.0f} {mwh:>8.2f} {row.mwh:>6g} {t:>8.2f} "
                     f"{row.tco2eq:>6g}  {'yes' if agrees else 'NO'}")
    return "\n".join(lines)


def carbon_command(
    gpu_hours: Annotated[float | None, Arg("device-hours of a run; omit for Table 15")] = None,
    power_w: Annotated[float, Arg("power per device in watts (A100-80GB: 400)")] = POWER_W,
    pue: Annotated[float, Arg("power usage effectiveness of the data centre")] = PUE,
    intensity: Annotated[float, Arg("carbon intensity in tCO2eq per MWh (US average)")] = INTENSITY,
) -> int:
    """Energy and CO2 of a run with the paper's formula (section 6): Wh = GPU-h x W x PUE,
    tCO2eq = MWh x intensity. Without --gpu-hours, recompute Table 15 beside the paper's figures."""
    if gpu_hours is None:
        print(table_15(power_w, pue, intensity))
    else:
        print(format_summary(run_summary(gpu_hours, power_w, pue, intensity)))
    return 0
