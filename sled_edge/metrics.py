"""The edge service's Prometheus metrics: rounds, acceptance, draft length k, round trip, requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ROUND_TRIP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class EdgeMetrics:
    """Implements the ``RoundObserver`` the EdgeDevice reports each verified round to."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rounds = Counter("sled_edge_rounds", "Verified rounds", registry=self.registry)
        self.draft_tokens = Counter("sled_edge_draft_tokens", "Draft tokens sent", registry=self.registry)
        self.accepted_tokens = Counter("sled_edge_accepted_tokens", "Draft tokens accepted", registry=self.registry)
        self.committed_tokens = Counter("sled_edge_committed_tokens", "Tokens committed", registry=self.registry)
        self.draft_length = Gauge("sled_edge_draft_length", "Draft tokens k of the last round", registry=self.registry)
        self.round_trip = Histogram("sled_edge_round_trip_seconds", "Draft published to verdict received",
                                    buckets=ROUND_TRIP_BUCKETS, registry=self.registry)
        self.requests = Counter("sled_edge_requests", "API requests", ["endpoint", "status"], registry=self.registry)
        self.active = Gauge("sled_edge_active_sessions", "Generations in progress", registry=self.registry)

    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None:
        self.rounds.inc()
        self.draft_tokens.inc(k)
        self.accepted_tokens.inc(accepted)
        self.committed_tokens.inc(committed)
        self.draft_length.set(k)
        self.round_trip.observe(round_trip_s)

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
