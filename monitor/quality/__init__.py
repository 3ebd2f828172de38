"""Estimates over all traffic from the labelled sample, and the statistics of the labels themselves
(agreement between reviewers, reward model against reviewers). Below ``review`` (the admin page
shows them) and ``actions`` (the worker publishes them as gauges): both read, neither owns them."""
