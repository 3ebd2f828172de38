"""What the monitor does about drift: reward-model update and policy retraining requests."""
