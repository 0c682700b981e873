"""Prometheus export of the verifier's counters: a collector that reads ``VerifierStats`` at scrape time.

The counting stays in the pure stats object; this module only translates it.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sled_verifier.stats import Histogram, VerifierStats


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total)


class VerifierCollector(Collector):
    def __init__(self, stats: VerifierStats, sessions: Callable[[], int]) -> None:
        self.stats = stats
        self.sessions = sessions

    def collect(self):
        s = self.stats
        yield CounterMetricFamily("sled_verifier_drafts", "Drafts verified", value=s.rounds)
        yield CounterMetricFamily("sled_verifier_draft_tokens", "Draft tokens verified", value=s.draft_tokens)
        yield CounterMetricFamily("sled_verifier_accepted_tokens", "Draft tokens accepted", value=s.accepted_tokens)
        per_position = CounterMetricFamily("sled_verifier_accepted_per_position",
                                           "Drafts whose token at this position was accepted", labels=["position"])
        for position, count in enumerate(list(s.accepted_per_position)):
            per_position.add_metric([str(position)], count)
        yield per_position
        yield GaugeMetricFamily("sled_verifier_mean_acceptance_length",
                                "Tokens committed per verified draft: 1 + accepted / drafts", value=s.mean_acceptance_length)
        yield CounterMetricFamily("sled_verifier_resyncs", "Resync verdicts sent", value=s.resyncs)
        yield CounterMetricFamily("sled_verifier_prefill_tokens", "Tokens prefilled for new or resynced sessions",
                                  value=s.prefill_tokens)
        errors = CounterMetricFamily("sled_verifier_errors", "Refused messages by kind", labels=["kind"])
        for kind, count in dict(s.errors).items():
            errors.add_metric([kind], count)
        yield errors
        yield CounterMetricFamily("sled_verifier_refusals_suppressed", "Refusals over a device's refusal budget, "
                                  "neither answered nor logged", value=s.refusals_suppressed)
        yield CounterMetricFamily("sled_verifier_retained_ignored", "Retained messages on drafts topics, never "
                                  "processed", value=s.retained_ignored)
        yield GaugeMetricFamily("sled_verifier_sessions", "Sessions held", value=self.sessions())
        yield CounterMetricFamily("sled_verifier_busy_seconds", "Time from taking a batch to its verdicts published",
                                  value=s.busy_s)
        yield CounterMetricFamily("sled_verifier_prefill_seconds", "Model time of prefill forwards", value=s.prefill_s)
        yield CounterMetricFamily("sled_verifier_step_seconds", "Engine step time (admission, prefill, forward, "
                                  "verification, commit)", value=s.step_s)
        yield CounterMetricFamily("sled_verifier_decide_seconds", "Verification and commit time in engine steps",
                                  value=s.decide_s)
        yield CounterMetricFamily("sled_verifier_receive_seconds", "Decoding and admitting inbound messages",
                                  value=s.receive_s)
        yield CounterMetricFamily("sled_verifier_publish_seconds", "Encoding and publishing verdicts", value=s.publish_s)
        yield CounterMetricFamily("sled_verifier_schedule_seconds", "Scheduler decisions", value=s.schedule_s)
        yield CounterMetricFamily("sled_verifier_loop_cpu_seconds", "CPU of the event-loop thread: MQTT, codec, "
                                  "admission, scheduling, publishing (all but the model thread)", value=s.loop_cpu_s())
        yield CounterMetricFamily("sled_verifier_deferred_drafts", "Drafts held over while their prefill completes",
                                  value=s.deferred)
        yield _histogram("sled_verifier_batch_size", "Drafts per forward pass", s.batch_size_hist)
        yield _histogram("sled_verifier_batch_tokens", "Tokens scored per forward pass", s.batch_tokens_hist)
        yield _histogram("sled_verifier_forward_seconds", "Model time per verification pass", s.forward_hist)
        yield _histogram("sled_verifier_queue_delay_seconds", "Time a draft waited for its batch", s.queue_delay_hist)
        yield _histogram("sled_verifier_added_wait_seconds", "Wait the scheduler chose for a draft while the model "
                         "was idle (its SLO is --max-wait-ms)", s.added_wait_hist)


def serve_metrics(stats: VerifierStats, sessions: Callable[[], int], host: str, port: int) -> int:
    """Expose /metrics on ``host:port`` from a daemon thread; returns the bound port."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(VerifierCollector(stats, sessions))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
