"""The composition root: builds the running service (store, source, dead letters, pipeline and its
observers, publishers, ops server) from ``Settings`` in one place."""

from monitor.service.build import Service, build_dead_letters, build_service, build_source, install_signal_handlers

__all__ = ["Service", "build_dead_letters", "build_service", "build_source", "install_signal_handlers"]
