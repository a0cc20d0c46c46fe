//! Prometheus metrics (prometheus-client), served as text on `/metrics`:
//!
//! - `web_requests_total{route, method, status}`: counter.
//! - `web_request_duration_seconds{route}`: histogram, time to the response head.
//! - `web_requests_in_flight`: gauge.
//! - `web_release_reloads_total{outcome}`: `switched`, `unchanged`, `refused`.
//! - `web_release_info{version}`: 1 for the version served.
//! - `web_ready`: 1 when `/healthz` says ok.
//!
//! Routes are a fixed set of names (never the raw path), so label cardinality stays bounded.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to ~20 s.
    Histogram::new(exponential_buckets(0.000_05, 2.5, 15))
}

/// The node's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    pub in_flight: Gauge,
    reloads: Family<OutcomeLabels, Counter>,
    release: Family<VersionLabels, Gauge>,
    ready: Gauge,
    current_version: Mutex<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("web_requests", "HTTP requests answered, by route, method and status", requests.clone());
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "web_request_duration_seconds",
            "Time from request head to response head, by route",
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("web_requests_in_flight", "Requests being handled", in_flight.clone());
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register("web_release_reloads", "Release reloads by outcome", reloads.clone());
        let release = Family::<VersionLabels, Gauge>::default();
        registry.register("web_release_info", "The release version served (value 1)", release.clone());
        let ready = Gauge::default();
        registry.register("web_ready", "1 when /healthz answers ok", ready.clone());
        Metrics {
            registry,
            requests,
            latency,
            in_flight,
            reloads,
            release,
            ready,
            current_version: Mutex::new(String::new()),
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn observe(&self, route: &'static str, method: &hyper::Method, status: u16, seconds: f64) {
        let method = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::POST => "POST",
            hyper::Method::PUT => "PUT",
            hyper::Method::DELETE => "DELETE",
            _ => "other",
        };
        self.requests.get_or_create(&RequestLabels { route, method, status }).inc();
        self.latency.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    /// Counts a release reload: `switched`, `unchanged` or `refused`.
    pub fn reload(&self, outcome: &'static str) {
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Records the version now served.
    pub fn set_release(&self, version: &str) {
        let mut current = self.current_version.lock().unwrap();
        if !current.is_empty() {
            self.release.remove(&VersionLabels { version: current.clone() });
        }
        self.release.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
        *current = version.to_owned();
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self, ready: bool) -> String {
        self.ready.set(i64::from(ready));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
