import Foundation
import Metrics
import Prometheus
import TernAPI
import TernCluster

/// GET /metrics of the agent and the controller: the counters and histograms recorded
/// through swift-metrics since the process started, and gauges of the present state made
/// afresh for each scrape (so that a VM gone from the host leaves no stale series).
final class MetricsEndpoint: Sendable {
    private let registry = PrometheusCollectorRegistry()

    init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets = [
            ClusterMetrics.downtime: ClusterMetrics.downtimeBuckets.map { Duration.nanoseconds(Int64($0 * 1e9)) },
            ClusterMetrics.duration: ClusterMetrics.durationBuckets.map { Duration.nanoseconds(Int64($0 * 1e9)) },
        ]
        MetricsSystem.bootstrap(factory)
    }

    /// A gauge of this moment's state, with its HELP line.
    static func gauge(_ registry: PrometheusCollectorRegistry, _ name: String, _ help: String, _ labels: [(String, String)] = []) -> Prometheus.Gauge {
        registry.makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    static func counter(_ registry: PrometheusCollectorRegistry, _ name: String, _ help: String, _ labels: [(String, String)] = []) -> Prometheus.Counter {
        registry.makeCounter(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    /// The exposition, with `present` adding the gauges of this moment to a registry of their own.
    func response(present: (PrometheusCollectorRegistry) -> Void) -> APIResponse {
        let now = PrometheusCollectorRegistry()
        present(now)
        var text = registry.emitToBuffer()
        text += now.emitToBuffer()
        return APIResponse(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8", body: Data(text))
    }
}
