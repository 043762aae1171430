"""Monte Carlo simulation: price a European call option with 10,000 independent runs.

Each run simulates one year of daily prices of a stock (geometric Brownian motion) with its
own random seed, and returns the option's discounted payoff; the price is their mean.
The runs are shoal tasks (``client.map``), spread over the workers; the average is one more
task that takes the runs' futures as its argument, so the payoffs never come back here.

    python examples/monte_carlo.py            # 10,000 runs
    python examples/monte_carlo.py --small    # 500 runs (a smoke test)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import shoal

S0, STRIKE, RATE, VOLATILITY, DAYS = 100.0, 105.0, 0.03, 0.2, 252


def simulate(seed: int) -> float:
    """One run: the discounted payoff of the call at the end of one simulated year."""
    rng = random.Random(seed)
    dt = 1.0 / DAYS
    drift = (RATE - 0.5 * VOLATILITY**2) * dt
    shock = VOLATILITY * math.sqrt(dt)
    price = S0
    for _ in range(DAYS):
        price *= math.exp(drift + shock * rng.gauss(0.0, 1.0))
    return math.exp(-RATE) * max(price - STRIKE, 0.0)


def summarize(payoffs: list[float]) -> tuple[float, float]:
    """The price estimate and its standard error."""
    return statistics.fmean(payoffs), statistics.stdev(payoffs) / math.sqrt(len(payoffs))


def black_scholes() -> float:
    """The exact price, to compare with."""
    d1 = (math.log(S0 / STRIKE) + (RATE + 0.5 * VOLATILITY**2)) / VOLATILITY
    d2 = d1 - VOLATILITY
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return S0 * cdf(d1) - STRIKE * math.exp(-RATE) * cdf(d2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="500 runs instead of 10,000")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    runs = 500 if args.small else 10_000

    with shoal.Client(n_workers=args.workers, threads_per_worker=1) as client:
        start = time.perf_counter()
        payoffs = client.map(simulate, range(runs))
        price, stderr = client.submit(summarize, payoffs).result()
        elapsed = time.perf_counter() - start

    exact = black_scholes()
    print(f"Monte Carlo: {runs:,} runs of {DAYS} days each on {args.workers} workers")
    print(f"option price {price:.3f} +- {stderr:.3f} (Black-Scholes: {exact:.3f})")
    print(f"took {elapsed:.2f} s")
    assert abs(price - exact) < 5 * stderr + 0.05, "the estimate is far off the exact price"


if __name__ == "__main__":
    main()
