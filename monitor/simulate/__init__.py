"""Entry point: the closed loop over an episode file with simulated reviewers (``oversight
simulate``), and the demo that tells it as a story (``oversight demo``)."""

from monitor.simulate.loop import BUNDLED_CONFIG, BUNDLED_PAIRS, Simulation, bundled, rating_of, run_simulation

__all__ = ["BUNDLED_CONFIG", "BUNDLED_PAIRS", "Simulation", "bundled", "rating_of", "run_simulation"]
