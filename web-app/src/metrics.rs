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

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Tells the `Metrics` of one node from another's (tests run several in one process).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// At most this many handles are kept per thread (then the cache starts over).
const MAX_HANDLES: usize = 64;

thread_local! {
    /// The request counter and latency histogram of each label set this thread has counted,
    /// by `Metrics` id: handles share their values with the families, and finding one here
    /// takes no lock and no hashing (the families' lookup takes a read lock shared by every
    /// HTTP thread, and hashes the labels, for every request).
    static HANDLES: RefCell<Vec<(u64, RequestLabels, Counter, Histogram)>> = const { RefCell::new(Vec::new()) };
}

/// The node's metrics and their registry.
pub struct Metrics {
    id: u64,
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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
        let labels = RequestLabels { route, method, status };
        HANDLES.with(|handles| {
            let mut handles = handles.borrow_mut();
            let found = handles.iter().position(|(id, l, ..)| *id == self.id && *l == labels);
            let i = found.unwrap_or_else(|| {
                if handles.len() >= MAX_HANDLES {
                    handles.clear();
                }
                let counter = self.requests.get_or_create(&labels).clone();
                let histogram = self.latency.get_or_create(&RouteLabels { route }).clone();
                handles.push((self.id, labels, counter, histogram));
                handles.len() - 1
            });
            let (_, _, counter, histogram) = &handles[i];
            counter.inc();
            histogram.observe(seconds);
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn requests_line(text: &str, route: &str, status: u16) -> Option<String> {
        let needle = format!("web_requests_total{{route=\"{route}\",method=\"GET\",status=\"{status}\"}}");
        text.lines().find(|l| l.starts_with(&needle)).map(str::to_owned)
    }

    /// Two nodes' metrics counted from the same thread (the handles this thread keeps are
    /// per `Metrics`) stay apart, and every count shows in the text.
    #[test]
    fn counts_stay_with_their_metrics() {
        let (a, b) = (Metrics::default(), Metrics::default());
        for _ in 0..3 {
            a.observe("static", &hyper::Method::GET, 200, 0.001);
        }
        b.observe("static", &hyper::Method::GET, 200, 0.001);
        a.observe("static", &hyper::Method::GET, 404, 0.001);
        let (ta, tb) = (a.encode(true), b.encode(true));
        assert!(requests_line(&ta, "static", 200).unwrap().ends_with(" 3"), "{ta}");
        assert!(requests_line(&ta, "static", 404).unwrap().ends_with(" 1"), "{ta}");
        assert!(requests_line(&tb, "static", 200).unwrap().ends_with(" 1"), "{tb}");
        assert!(requests_line(&tb, "static", 404).is_none(), "{tb}");
        assert!(ta.contains("web_request_duration_seconds_count{route=\"static\"} 4"), "{ta}");
        assert!(tb.contains("web_request_duration_seconds_count{route=\"static\"} 1"), "{tb}");
    }

    /// More label sets than the thread keeps handles for: every request is still counted.
    #[test]
    fn counts_survive_the_handle_cache_starting_over() {
        let metrics = Metrics::default();
        let statuses: Vec<u16> = (0..(MAX_HANDLES as u16 + 10)).map(|i| 200 + i).collect();
        for round in 0..2 {
            for &status in &statuses {
                metrics.observe("other", &hyper::Method::GET, status, 0.0);
            }
            let text = metrics.encode(true);
            for &status in &statuses {
                let line = requests_line(&text, "other", status).unwrap_or_else(|| panic!("{status} missing"));
                assert!(line.ends_with(&format!(" {}", round + 1)), "{line}");
            }
        }
    }
}
