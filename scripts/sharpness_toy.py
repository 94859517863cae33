"""The exact toy of seed 002 (Wen, Ma & Li, ICLR 2023, Fig. 1): three algorithms, three sharpness notions, three limits.

    OMP_NUM_THREADS=1 python scripts/sharpness_toy.py --out outputs/sharpness_toy

L(x) = F1(x1, x2)·x3² + F2(x1, x2)·x4² on R⁴ with F1 = 2 + (x1 − 1)² + x2² and F2 = 1/2 + ((x1 + 1)² + x2²)/4, so
F1 > F2 > 0 (REFERENCE.md §2a). Its zero-loss manifold is x3 = x4 = 0; there the Hessian's non-zero eigenvalues are
2F1 and 2F2: λ_max = 2F1, the trace 2(F1 + F2), the smallest non-zero eigenvalue 2F2. Started off the manifold, each
algorithm first falls onto it (Phase I, a few hundred steps) and then drifts along it at a speed of order η·ρ²
(Phase II, some multiple of 1/(η·ρ²) steps) towards the minimizer of the sharpness it regularizes (small η and ρ):

  full-batch SAM on L = L0 + L1                      -> argmin F1      = (1, 0)    worst direction, λ_max
  1-SAM: SAM on one sample per step, L0 = F1·x3² or
         L1 = F2·x4², drawn uniformly (seeded)        -> argmin F1 + F2 = (3/5, 0)  average direction, trace
  gradient descent on L(x + ρ∇L(x)/‖∇L(x)‖), the
         gradient taken through the direction too    -> argmin F2      = (−1, 0)   ascent direction, λ_min

Both SAMs are sam_runner.optim.SAM around plain SGD (no momentum, no weight decay) on a model whose parameter is x.

Defaults: η = 0.01, ρ = 0.25 (η·ρ² = 6.25e-4: 1/(η·ρ²) = 1,600 steps), 16,000 steps for each algorithm, start
x = (−0.2, 1, 0.5, 0.5) (off the manifold, (x1, x2) at least 1.28 from every limit), 1-SAM's draws from --seed 0;
float64 throughout. η is small because finite η moves the limits: 1-SAM's by O(η) (to x1 = 0.607 at η = 0.01), and
gradient descent on the ascent-direction loss settles in a 2-cycle that stops it far short of argmin F2 (at x1 = 0.48
for η = 0.01, 0.15 for η = 0.0025): docs/sharpness.md, "The exact toy of seed 002", has the analysis and the runs.

Each algorithm is reported by its final iterate and by the mean of the last quarter of its path (the tail): 1-SAM's
drift is a random walk about its limit, so its tail mean is the estimate of that limit; for the deterministic two,
final iterate and tail mean agree once they have converged. Distances are Euclidean, in the (x1, x2) plane.
"phase I" is the first step with ‖(x3, x4)‖ < ρ: the fall onto the manifold is over.

Writes to --out: sharpness_toy.png (the three paths in the (x1, x2) plane over contour lines of F1 + F2, i.e. half the
trace on the manifold, with the predicted points marked), sharpness_toy.json and sharpness_toy.csv (the table printed
at the end, plus the settings).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: a file, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from sam_runner.optim import SAM  # noqa: E402

DTYPE = torch.float64
# F_k(z) = BASE_k + WEIGHT_k·‖z − CENTRE_k‖² for z = (x1, x2); k = 0 is F1, k = 1 is F2.
BASE = torch.tensor([2.0, 0.5], dtype=DTYPE)
WEIGHT = torch.tensor([1.0, 0.25], dtype=DTYPE)
CENTRE = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DTYPE)
TAIL = 0.25  # the last quarter of a path gives its tail mean


@dataclass(frozen=True)
class Algorithm:
    name: str
    sharpness: str  # the notion it regularizes, by the paper's theory
    mix: tuple[float, float]  # it is predicted to go to argmin mix[0]·F1 + mix[1]·F2


ALGORITHMS = {a.name: a for a in (Algorithm("sam", "lambda_max", (1.0, 0.0)),
                                  Algorithm("1-sam", "trace", (1.0, 1.0)),
                                  Algorithm("ascent-gd", "lambda_min", (0.0, 1.0)))}


def factors(z: Tensor) -> Tensor:
    """(F1, F2) at z = (x1, x2), over any leading dimensions of z (a grid for the contours)."""
    return BASE + WEIGHT * ((z[..., None, :] - CENTRE) ** 2).sum(-1)


def sample_losses(x: Tensor) -> Tensor:
    """(L0, L1) = (F1·x3², F2·x4²): the two samples whose sum is L."""
    return factors(x[:2]) * x[2:] ** 2


def loss(x: Tensor) -> Tensor:
    return sample_losses(x).sum()


def argmin(mix: tuple[float, float]) -> tuple[float, float]:
    """The minimizer of mix[0]·F1 + mix[1]·F2 in closed form: a positive sum of isotropic quadratics is one, centred
    at the mean of their centres weighted by mix_k·WEIGHT_k."""
    weights = torch.tensor(mix, dtype=DTYPE) * WEIGHT
    return tuple((weights @ CENTRE / weights.sum()).tolist())


class Toy(nn.Module):
    """The toy as a model: its parameter is the point x, its forward pass the two samples' losses."""

    def __init__(self, start: tuple[float, ...]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=DTYPE))

    def forward(self) -> Tensor:
        return sample_losses(self.x)


def follow(model: Toy, steps: int, step: Callable[[int], None]) -> Tensor:
    """The path of x, (steps + 1) × 4, under `step(t)` for t = 0 … steps − 1."""
    path = torch.empty(steps + 1, 4, dtype=DTYPE)
    path[0] = model.x.detach()
    for t in range(steps):
        step(t)
        path[t + 1] = model.x.detach()
    return path


def run_sam(start: tuple[float, ...], eta: float, rho: float, steps: int, draws: list[int] | None = None) -> Tensor:
    """SAM (the runner's) around plain SGD: on the full batch L0 + L1, or, given draws, on sample draws[t] at step t."""
    model = Toy(start)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=eta)

    def step(t: int) -> None:
        def closure() -> Tensor:
            losses = model()
            batch_loss = losses.sum() if draws is None else losses[draws[t]]
            batch_loss.backward()
            return batch_loss

        optimizer.zero_grad()
        closure()  # the gradient at x, for the ascent
        optimizer.step(closure)  # the gradient at x + ε, for the descent

    return follow(model, steps, step)


def one_sam_draws(steps: int, seed: int) -> list[int]:
    """Which sample 1-SAM uses at each step: uniform over {0, 1}, from a local generator (not the global RNG)."""
    return torch.randint(2, (steps,), generator=torch.Generator().manual_seed(seed)).tolist()


def ascent_loss(x: Tensor, rho: float) -> Tensor:
    """L(x + ρ∇L(x)/‖∇L(x)‖) with the graph of ∇L kept, so that its gradient includes the derivative of the normalized
    direction: gradient descent on L^Asc = L + R^Asc itself, not SAM (SAM drops that derivative)."""
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    return loss(x + rho * grad / grad.norm())


def run_ascent_gd(start: tuple[float, ...], eta: float, rho: float, steps: int) -> Tensor:
    """Plain gradient descent on the ascent-direction loss."""
    model = Toy(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)

    def step(_: int) -> None:
        optimizer.zero_grad()
        ascent_loss(model.x, rho).backward()
        optimizer.step()

    return follow(model, steps, step)


def run(name: str, start: tuple[float, ...], eta: float, rho: float, steps: int, seed: int) -> Tensor:
    """One algorithm's path by its name in ALGORITHMS."""
    if name == "sam":
        return run_sam(start, eta, rho, steps)
    if name == "1-sam":
        return run_sam(start, eta, rho, steps, one_sam_draws(steps, seed))
    return run_ascent_gd(start, eta, rho, steps)


def tail(path: Tensor) -> Tensor:
    """The last quarter of a path (at least its last point)."""
    return path[-max(1, round(TAIL * (len(path) - 1))):]


@dataclass(frozen=True)
class Outcome:
    algorithm: str
    sharpness: str
    predicted: tuple[float, float]
    final: tuple[float, float]
    final_distance: float
    tail_mean: tuple[float, float]
    tail_sd: float  # root-mean-square distance of the tail's points from the tail mean
    tail_distance: float
    phase1_steps: int | None  # the first step with ‖(x3, x4)‖ < ρ: when the fall onto the manifold ended
    final_normal: float  # ‖(x3, x4)‖ at the end
    steps: int
    eta: float
    rho: float
    seed: int | None
    runtime_s: float


def outcome(algorithm: Algorithm, path: Tensor, eta: float, rho: float, seed: int | None, runtime_s: float) -> Outcome:
    predicted = torch.tensor(argmin(algorithm.mix), dtype=DTYPE)
    end = tail(path)[:, :2]
    mean = end.mean(0)
    near = (path[:, 2:].norm(dim=1) < rho).nonzero()
    return Outcome(
        algorithm=algorithm.name, sharpness=algorithm.sharpness, predicted=tuple(predicted.tolist()),
        final=tuple(path[-1, :2].tolist()), final_distance=float((path[-1, :2] - predicted).norm()),
        tail_mean=tuple(mean.tolist()), tail_sd=float((end - mean).norm(dim=1).pow(2).mean().sqrt()),
        tail_distance=float((mean - predicted).norm()), phase1_steps=int(near[0]) if len(near) else None,
        final_normal=float(path[-1, 2:].norm()), steps=len(path) - 1, eta=eta, rho=rho, seed=seed,
        runtime_s=round(runtime_s, 2))


def point(p: tuple[float, float]) -> str:
    return f"({p[0]:+.4f}, {p[1]:+.4f})"


def table(outcomes: list[Outcome]) -> str:
    header = (f"{'algorithm':<10} {'minimizes':<10} {'predicted':<18} {'final':<18} {'dist':>7} {'tail mean':<18} "
              f"{'tail sd':>7} {'dist':>7} {'phase I':>7} {'steps':>6} {'eta':>5} {'rho':>5} {'time_s':>6}")
    rows = [f"{o.algorithm:<10} {o.sharpness:<10} {point(o.predicted):<18} {point(o.final):<18} "
            f"{o.final_distance:>7.4f} {point(o.tail_mean):<18} {o.tail_sd:>7.4f} {o.tail_distance:>7.4f} "
            f"{o.phase1_steps!s:>7} {o.steps:>6} {o.eta:>5g} {o.rho:>5g} {o.runtime_s:>6.1f}" for o in outcomes]
    return "\n".join([header, *rows])


def write_csv(outcomes: list[Outcome], path: Path) -> None:
    """One row per algorithm; points split into their two coordinates."""
    rows = []
    for o in outcomes:
        row = {}
        for key, value in asdict(o).items():
            if isinstance(value, tuple):
                row.update({f"{key}_x1": value[0], f"{key}_x2": value[1]})
            else:
                row[key] = value
        rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


COLOURS = {"sam": "tab:red", "1-sam": "tab:green", "ascent-gd": "tab:blue"}
LABELS = {"sam": "full-batch SAM", "1-sam": "1-SAM", "ascent-gd": "GD on L(x+ρ∇L/‖∇L‖)"}
TARGETS = {"sam": "argmin $F_1$ ($\\lambda_{max}$)", "1-sam": "argmin $F_1+F_2$ (trace)",
           "ascent-gd": "argmin $F_2$ ($\\lambda_{min}$)"}


def plot(paths: dict[str, Tensor], outcomes: list[Outcome], start: tuple[float, ...], path: Path) -> None:
    """The (x1, x2) paths over contour lines of F1 + F2 (half the trace on the manifold), predicted limits marked."""
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    x1, x2 = torch.meshgrid(torch.linspace(-1.5, 1.5, 301, dtype=DTYPE), torch.linspace(-0.6, 1.3, 191, dtype=DTYPE),
                            indexing="ij")
    trace = factors(torch.stack([x1, x2], -1)).sum(-1)
    lines = ax.contour(x1, x2, trace, levels=12, colors="0.75", linewidths=0.7)
    ax.clabel(lines, fontsize=7, fmt="%.1f")
    for o in outcomes:
        colour = COLOURS[o.algorithm]
        xy = paths[o.algorithm][:, :2]
        ax.plot(xy[:, 0], xy[:, 1], color=colour, linewidth=1.2, label=LABELS[o.algorithm])
        ax.plot(*o.tail_mean, "o", color=colour, markersize=5, markeredgecolor="black", markeredgewidth=0.6)
    for name, algorithm in ALGORITHMS.items():
        target = argmin(algorithm.mix)
        ax.plot(*target, "*", color=COLOURS[name], markersize=14, markeredgecolor="black", markeredgewidth=0.6)
        ax.annotate(TARGETS[name], target, xytext=(0, -16 if name != "1-sam" else -30), textcoords="offset points",
                    ha="center", fontsize=8, color=COLOURS[name])
    ax.plot(start[0], start[1], "kx", markersize=8)
    ax.annotate("start", start[:2], xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.plot([], [], "k*", markersize=10, label="predicted limit")
    ax.plot([], [], "ko", markersize=5, label="tail mean (last quarter)")
    ax.set(xlabel="$x_1$", ylabel="$x_2$", xlim=(-1.5, 1.5), ylim=(-0.6, 1.3),
           title=f"Seed 002's toy: the $(x_1, x_2)$ paths over contours of $F_1+F_2$\n"
                 f"η = {outcomes[0].eta:g}, ρ = {outcomes[0].rho:g}, {outcomes[0].steps} steps")
    ax.title.set_fontsize(10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/sharpness_toy"), help="directory for the files")
    parser.add_argument("--eta", type=float, default=0.01, help="learning rate η of all three (default 0.01)")
    parser.add_argument("--rho", type=float, default=0.25, help="radius ρ of all three (default 0.25)")
    parser.add_argument("--steps", type=int, default=16_000, help="steps of each algorithm (default 16000)")
    parser.add_argument("--start", type=float, nargs=4, default=(-0.2, 1.0, 0.5, 0.5), metavar="X",
                        help="the start point x1 x2 x3 x4 of all three (default -0.2 1 0.5 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="1-SAM's draws (default 0)")
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eta <= 0 or args.rho <= 0:
        parser.error("--steps, --eta and --rho must be positive")

    torch.set_num_threads(1)  # 4-entry tensors: threads only add overhead
    start = tuple(args.start)
    paths, outcomes = {}, []
    for name in args.algorithms:
        began = time.perf_counter()
        paths[name] = run(name, start, args.eta, args.rho, args.steps, args.seed)
        seed = args.seed if name == "1-sam" else None
        outcomes.append(outcome(ALGORITHMS[name], paths[name], args.eta, args.rho, seed, time.perf_counter() - began))

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"argv": sys.argv[1:] if argv is None else argv, "start": start, "tail_fraction": TAIL,
                "torch": torch.__version__, "dtype": str(DTYPE)}
    (args.out / "sharpness_toy.json").write_text(
        json.dumps({"settings": settings, "results": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    write_csv(outcomes, args.out / "sharpness_toy.csv")
    plot(paths, outcomes, start, args.out / "sharpness_toy.png")
    print(table(outcomes))
    print(f"files: {args.out}/sharpness_toy.{{png,json,csv}}")
    return outcomes


if __name__ == "__main__":
    main()
