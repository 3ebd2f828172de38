"""Online drift detectors (the detector contract and its implementations)."""
