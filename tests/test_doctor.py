"""`python -m lgsae.doctor` on the CPU: versions, every op's path with its reason, the step timing
next to its floor."""

import subprocess
import sys


def test_doctor_reports_paths_reasons_and_the_step_against_its_floor(capsys):
    from lgsae import doctor
    from lgsae.ops import _KERNEL_MODULES

    out = doctor.main(["--seconds", "0.4", "--device", "cpu"])
    text = capsys.readouterr().out
    assert set(out["ops"]) == set(_KERNEL_MODULES)
    assert all(p == "reference (CPU tensors: the Triton kernels run on CUDA only)"
               for p in out["ops"].values())
    assert "torch 2." in text and "triton" in text and "transformers" in text
    t = out["timing"]
    assert (t["batch"], t["dtype"], t["M"]) == (256, "float32", 4608)  # the CPU defaults
    assert t["step_s"] > 0 and t["floor_s"] > 0 and t["ratio"] == t["step_s"] / t["floor_s"]
    assert f"step = {t['ratio']:.2f}x floor" in text


def test_doctor_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "lgsae.doctor", "--seconds", "0.2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("device: ") and "x floor" in proc.stdout
