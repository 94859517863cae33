"""A run's digits depend on the CPU's kernels: run.json records what picks them, so two runs can be compared."""

from pathlib import Path

from conftest import TINY, read_json, run_cli


def test_run_json_records_the_thread_count_and_the_cpu_instruction_set(workdir: Path) -> None:
    """Measured with the main job (README): 1 and 2 threads, or oneDNN's AVX-512 and AVX2 kernels, give other
    digits, each bitwise repeatable; ATEN_CPU_CAPABILITY stands in here for a CPU with another instruction set."""
    env = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    result = run_cli("sam-run", *TINY, "epochs=1", "sharpness.measures=[]", "hydra.run.dir=outputs/run",
                     cwd=workdir, extra_env=env)
    assert result.returncode == 0, result.stderr
    info = read_json(workdir / "outputs" / "run" / "run.json")
    assert info["torch_threads"] == 1 and info["cpu_capability"] == "DEFAULT"
