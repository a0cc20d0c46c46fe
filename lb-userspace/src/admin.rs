//! The admin HTTP API (hyper): `/metrics` (Prometheus text), `/status` (JSON), `/live`,
//! `/ready`. Loopback by default; read-only.

use std::{convert::Infallible, fmt, sync::{atomic::Ordering, Arc}};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_common::{
    firewall::Prefix,
    stats::{Counter, GlobalStats, TrafficStats},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use serde_json::json;
use tracing::debug;

use crate::daemon::Shared;

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// Packets by XDP action, derived from the reason counters.
pub fn actions(g: &GlobalStats) -> [(&'static str, u64); 4] {
    ["pass", "tx", "redirect", "drop"].map(|a| (a, Counter::BALANCER.iter().filter(|c| c.action() == Some(a)).map(|&c| g.get(c)).sum()))
}

struct LbCollector(Arc<Shared>);

impl fmt::Debug for LbCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LbCollector")
    }
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(String, String)>, u64)],
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Collector for LbCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let dp = self.0.dataplane.lock().expect("lock");
        let topo = self.0.topology.lock().expect("lock");
        let g = dp.global_stats().unwrap_or_default();
        let rows: Vec<_> = Counter::BALANCER.iter().map(|&c| (l(&[("reason", c.name())]), g.get(c))).collect();
        counter_family(&mut enc, "lb_xdp_packets", "Packets seen by the balancer program, by reason", &rows)?;
        let rows: Vec<_> = actions(&g).iter().map(|&(a, v)| (l(&[("action", a)]), v)).collect();
        counter_family(&mut enc, "lb_xdp_actions", "Packets by XDP action", &rows)?;

        let vip_stats: Vec<(Vec<(String, String)>, TrafficStats)> = topo
            .vips
            .iter()
            .map(|v| (l(&[("vip", &v.vip), ("name", &v.name)]), dp.vip_stats(v.vip_num).unwrap_or_default()))
            .collect();
        let backend_stats: Vec<(Vec<(String, String)>, TrafficStats)> = topo
            .backends
            .iter()
            .map(|b| (l(&[("backend", &b.name), ("address", &b.address.to_string())]), dp.backend_stats(b.index).unwrap_or_default()))
            .collect();
        for (what, stats) in [("vip", &vip_stats), ("backend", &backend_stats)] {
            for (field, help, get) in [
                ("packets", "Packets", (|s: &TrafficStats| s.packets) as fn(&TrafficStats) -> u64),
                ("bytes", "Bytes (Ethernet and IP headers included)", |s| s.bytes),
                ("new_flows", "New flows placed", |s| s.new_flows),
            ] {
                let rows: Vec<_> = stats.iter().map(|(labels, s)| (labels.clone(), get(s))).collect();
                counter_family(&mut enc, &format!("lb_{what}_{field}"), &format!("{help}, per {what}"), &rows)?;
            }
        }
        let mut m = enc.encode_descriptor("lb_backend_weight", "Configured weight of a backend in a VIP", None, MetricType::Gauge)?;
        for v in &topo.vips {
            for vb in &v.backends {
                let b = &topo.backends[vb.backend as usize];
                ConstGauge::new(i64::from(vb.weight)).encode(m.encode_family(&l(&[("vip", &v.vip), ("backend", &b.name)]))?)?;
            }
        }
        let health = self.0.health.lock().expect("lock");
        let mut m = enc.encode_descriptor("lb_backend_up", "1 if the backend passes its health checks", None, MetricType::Gauge)?;
        for b in &topo.backends {
            ConstGauge::new(i64::from(health[b.index as usize].up)).encode(m.encode_family(&l(&[("backend", &b.name)]))?)?;
        }
        let rows: Vec<_> = topo
            .backends
            .iter()
            .flat_map(|b| {
                let h = &health[b.index as usize];
                [(l(&[("backend", &b.name), ("result", "ok")]), h.checks_ok), (l(&[("backend", &b.name), ("result", "failed")]), h.checks_failed)]
            })
            .collect();
        counter_family(&mut enc, "lb_backend_checks", "Health checks, by result", &rows)?;
        let rows: Vec<_> = topo.backends.iter().filter(|b| !b.removed).map(|b| (l(&[("backend", &b.name)]), health[b.index as usize].transitions)).collect();
        counter_family(&mut enc, "lb_backend_transitions", "Health state changes (up to down or back)", &rows)?;
        let mut m = enc.encode_descriptor("lb_backend_check_latency_seconds", "Duration of the last successful check", None, MetricType::Gauge)?;
        for b in &topo.backends {
            if let Some(ms) = health[b.index as usize].last_latency_ms {
                ConstGauge::new(ms / 1000.0).encode(m.encode_family(&l(&[("backend", &b.name)]))?)?;
            }
        }
        let mut m = enc.encode_descriptor("lb_vip_live_backends", "Backends of the VIP that take new flows", None, MetricType::Gauge)?;
        for v in &topo.vips {
            let live = v.backends.iter().filter(|m| health[m.backend as usize].up && m.weight > 0).count();
            ConstGauge::new(live as i64).encode(m.encode_family(&l(&[("vip", &v.vip), ("name", &v.name)]))?)?;
        }
        // Rules that decided nothing yet are left out: a blocklist may hold thousands.
        let rules: Vec<_> = dp.firewall_stats().unwrap_or_default().into_iter().filter(|(_, s)| s.packets > 0).collect();
        for (field, help) in [("packets", "Packets"), ("bytes", "Bytes (Ethernet and IP headers included)")] {
            let rows: Vec<_> = rules
                .iter()
                .map(|(r, s)| (l(&[("prefix", &r.prefix.to_string()), ("verdict", r.verdict())]), if field == "packets" { s.packets } else { s.bytes }))
                .collect();
            counter_family(&mut enc, &format!("lb_firewall_{field}"), &format!("{help} a firewall rule decided (dropped or let through), per rule that matched any"), &rows)?;
        }
        let mut m = enc.encode_descriptor("lb_firewall_rules", "Firewall rules in force, by verdict", None, MetricType::Gauge)?;
        let all = self.0.firewall.lock().expect("lock");
        for verdict in ["deny", "allow"] {
            ConstGauge::new(all.iter().filter(|r| r.verdict() == verdict).count() as i64).encode(m.encode_family(&l(&[("verdict", verdict)]))?)?;
        }
        drop(all);
        if let Some(r) = self.0.sync.lock().expect("lock").as_ref() {
            let st = &r.stats;
            for (name, help, v) in [
                ("lb_sync_messages_sent", "Flow-sync datagrams sent to peers (heartbeats included)", st.messages_sent),
                ("lb_sync_entries_sent", "Flow entries sent to peers", st.entries_sent),
                ("lb_sync_messages_received", "Flow-sync datagrams taken from peers", st.messages_received),
                ("lb_sync_entries_received", "Flow entries received from peers", st.entries_received),
                ("lb_sync_unknown_backend", "Received flow entries naming a backend this balancer does not have", st.unknown_backend),
                ("lb_sync_full_dumps", "Whole flow tables sent to peers that started", st.full_dumps_sent),
            ] {
                counter_family(&mut enc, name, help, &[(Vec::new(), v)])?;
            }
            counter_family(&mut enc, "lb_sync_merged", "Received flow entries written into the flow table, by result", &[
                (l(&[("result", "inserted")]), st.inserted),
                (l(&[("result", "updated")]), st.updated),
            ])?;
            let rows: Vec<_> = ["malformed", "auth", "not_peer", "table_size", "replay"]
                .iter()
                .map(|&k| (l(&[("reason", k)]), st.rejected.get(k).copied().unwrap_or(0)))
                .collect();
            counter_family(&mut enc, "lb_sync_rejected", "Flow-sync datagrams refused, by reason", &rows)?;
            let mut m = enc.encode_descriptor("lb_sync_peer_up", "1 if the peer balancer was heard within the last intervals", None, MetricType::Gauge)?;
            for p in &r.peers {
                ConstGauge::new(i64::from(p.up)).encode(m.encode_family(&l(&[("peer", &p.address.to_string())]))?)?;
            }
            let mut m = enc.encode_descriptor("lb_sync_peer_synced", "1 once the peer's whole flow table has arrived", None, MetricType::Gauge)?;
            for p in &r.peers {
                ConstGauge::new(i64::from(p.synced)).encode(m.encode_family(&l(&[("peer", &p.address.to_string())]))?)?;
            }
        }
        if let Some(a) = &self.0.announce {
            let mut m = enc.encode_descriptor("lb_vip_routes_announced", "1 while the VIP routes are up for the routing daemon to announce", None, MetricType::Gauge)?;
            let up = i64::from(self.0.announcing.load(Ordering::SeqCst));
            ConstGauge::new(up).encode(m.encode_family(&l(&[("table", &a.table.to_string()), ("device", &a.name)]))?)?;
        }
        let mut m = enc.encode_descriptor("lb_xdp_attached", "XDP program attached to an interface, by mode", None, MetricType::Gauge)?;
        for a in &topo.xdp {
            ConstGauge::new(1i64).encode(m.encode_family(&l(&[("interface", &a.interface), ("mode", a.mode)]))?)?;
        }
        Ok(())
    }
}

pub fn status_json(shared: &Shared) -> serde_json::Value {
    let dp = shared.dataplane.lock().expect("lock");
    let topo = shared.topology.lock().expect("lock");
    let health = shared.health.lock().expect("lock");
    let runtime = shared.runtime.lock().expect("lock");
    let g = dp.global_stats().unwrap_or_default();
    let vips: Vec<_> = topo
        .vips
        .iter()
        .map(|v| {
            let s = dp.vip_stats(v.vip_num).unwrap_or_default();
            let backends: Vec<_> = v
                .backends
                .iter()
                .map(|vb| {
                    let b = &topo.backends[vb.backend as usize];
                    let bs = dp.backend_stats(b.index).unwrap_or_default();
                    let h = &health[b.index as usize];
                    let rt = runtime.get(&b.name).cloned().unwrap_or_default();
                    json!({"name": b.name, "address": b.address, "mac": b.mac, "weight": rt.weight.unwrap_or(vb.weight),
                           "state": if h.up { "up" } else { "down" }, "admin_state": rt.state, "health": h,
                           "packets": bs.packets, "bytes": bs.bytes, "new_flows": bs.new_flows})
                })
                .collect();
            let live = v.ring_len.min(1) * v.backends.iter().filter(|m| {
                let rt = runtime.get(&topo.backends[m.backend as usize].name).cloned().unwrap_or_default();
                health[m.backend as usize].up && rt.state == crate::daemon::AdminState::Ready && rt.weight.unwrap_or(m.weight) > 0
            }).count();
            json!({"name": v.name, "vip": v.vip, "mode": v.mode, "allow": v.allow, "ring_len": v.ring_len, "live_backends": live,
                   "state": if live == 0 { "down: no live backend, packets dropped" } else { "up" }, "packets": s.packets,
                   "bytes": s.bytes, "new_flows": s.new_flows, "backends": backends})
        })
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> =
        Counter::BALANCER.iter().map(|&c| (c.name().to_string(), json!(g.get(c)))).collect();
    json!({
        "version": topo.version,
        "ready": shared.ready.load(Ordering::SeqCst),
        "encap_source": topo.encap_source,
        "flow_table_size": topo.flow_table_size,
        "flood_guard": topo.flood_guard,
        "source_flow_limit": topo.source_flow_limit,
        "firewall": {
            "deny": shared.firewall.lock().expect("lock").iter().filter(|r| !r.allow).count(),
            "allow": shared.firewall.lock().expect("lock").iter().filter(|r| r.allow).count(),
            "dropped": g.get(Counter::Firewall),
        },
        "xdp": topo.xdp,
        "sync": *shared.sync.lock().expect("lock"),
        "announce": shared.announce.as_ref().map(|a| json!({"table": a.table, "device": a.name, "announcing": shared.announcing.load(Ordering::SeqCst)})),
        "vips": vips,
        "counters": counters,
        "actions": actions(&g).iter().map(|&(a, v)| (a.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

/// The prefixes of a request body: separated by spaces, commas or lines.
fn prefix_words(body: &str) -> impl Iterator<Item = &str> {
    body.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty())
}

/// `GET /firewall`: every rule with the packets and bytes it decided.
pub fn firewall_json(shared: &Shared) -> serde_json::Value {
    let dp = shared.dataplane.lock().expect("lock");
    let rules = dp.firewall_stats().unwrap_or_default();
    let dropped = dp.global_stats().unwrap_or_default().get(Counter::Firewall);
    json!({
        "max_rules": lb_common::firewall::MAX_RULES,
        "dropped": dropped,
        "rules": rules.iter().map(|(r, s)| json!({"prefix": r.prefix.to_string(), "verdict": r.verdict(), "packets": s.packets, "bytes": s.bytes})).collect::<Vec<_>>(),
    })
}

/// `POST /backends/<name>/state` (body `ready`, `drain` or `maint`),
/// `POST /backends/<name>/weight` (body 0..=256, or `config` for the configured weights),
/// `POST /vips` (JSON `VipSpec`), `DELETE /vips/<name>`, `POST /vips/<name>/backends` (JSON
/// `BackendSpec`), `DELETE /vips/<name>/backends/<backend>`, `POST /vips/<name>/allow`
/// (prefixes: the sources the VIP takes; empty: all), `POST /firewall/deny` and
/// `POST /firewall/allow` (prefixes, separated by spaces, commas or lines), `POST
/// /firewall/reload` (the configuration file's rules),
/// `DELETE /firewall/<prefix>` (`a.b.c.d/len` or an address); all with
/// `Authorization: Bearer <token>`.
async fn mutate(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    use http_body_util::BodyExt;
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == shared.token);
    if !authorized {
        return reply(StatusCode::UNAUTHORIZED, "text/plain", "missing or wrong token: send Authorization: Bearer <token from the token file>\n");
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", "body too large (64 KiB at most)\n"),
    };
    let parts: Vec<String> = path.trim_matches('/').split('/').map(str::to_string).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let done = |r: Result<(), crate::daemon::ApiError>, what: String| match r {
        Ok(()) => reply(StatusCode::OK, "application/json", format!("{}\n", json!({"done": what}))),
        Err(crate::daemon::ApiError(code, msg)) => {
            reply(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST), "text/plain", format!("{msg}\n"))
        }
    };
    let json_err = |e: serde_json::Error| reply(StatusCode::BAD_REQUEST, "text/plain", format!("body is not the expected JSON: {e}\n"));
    let (name, what) = match (method.as_str(), parts.as_slice()) {
        ("POST", ["backends", name, what]) => (name.to_string(), what.to_string()),
        ("POST", ["vips"]) => {
            return match serde_json::from_str::<crate::daemon::VipSpec>(&body) {
                Ok(spec) => done(crate::daemon::add_vip(&shared, &spec), format!("added VIP {}", spec.name)),
                Err(e) => json_err(e),
            }
        }
        ("DELETE", ["vips", vip]) => return done(crate::daemon::remove_vip(&shared, vip), format!("removed VIP {vip}")),
        ("POST", ["vips", vip, "allow"]) => {
            let words: Vec<String> = prefix_words(&body).map(str::to_string).collect();
            let allow = match crate::daemon::parse_allow(&words) {
                Ok(a) => a,
                Err(crate::daemon::ApiError(_, msg)) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{msg}\n")),
            };
            let what = if allow.is_empty() { format!("{vip} open to every source") } else { format!("{vip} allows {}", words.join(" ")) };
            return done(crate::daemon::set_vip_allow(&shared, vip, &allow), what);
        }
        ("POST", ["vips", vip, "backends"]) => {
            return match serde_json::from_str::<crate::daemon::BackendSpec>(&body) {
                Ok(spec) => done(crate::daemon::add_member(&shared, vip, &spec), format!("added {} to {vip}", spec.name)),
                Err(e) => json_err(e),
            }
        }
        ("DELETE", ["vips", vip, "backends", b]) => return done(crate::daemon::remove_member(&shared, vip, b), format!("removed {b} from {vip}")),
        ("POST", ["firewall", "reload"]) => {
            return match crate::daemon::reload_firewall(&shared) {
                Ok(n) => reply(StatusCode::OK, "application/json", format!("{}\n", json!({"done": "firewall reloaded from the configuration", "rules": n}))),
                Err(crate::daemon::ApiError(code, msg)) => reply(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST), "text/plain", format!("{msg}\n")),
            };
        }
        ("POST", ["firewall", verdict @ ("deny" | "allow")]) => {
            let allow = *verdict == "allow";
            let mut prefixes = Vec::new();
            for word in prefix_words(&body) {
                match word.parse::<Prefix>() {
                    Ok(p) => prefixes.push(p),
                    Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{word:?}: {e}\n")),
                }
            }
            if prefixes.is_empty() {
                return reply(StatusCode::BAD_REQUEST, "text/plain", "no prefix in the body: send one or more, like 203.0.113.0/24\n");
            }
            let what = format!("{verdict} {}", prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "));
            let r = crate::daemon::change_firewall(&shared, &what, |rules| {
                for p in &prefixes {
                    rules.insert(*p, allow);
                }
                Ok(())
            });
            return done(r.map(|_| ()), what);
        }
        ("DELETE", ["firewall", prefix @ ..]) if !prefix.is_empty() => {
            let text = prefix.join("/");
            let p = match text.parse::<Prefix>() {
                Ok(p) => p,
                Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{text:?}: {e}\n")),
            };
            let what = format!("remove the rule for {p}");
            let r = crate::daemon::change_firewall(&shared, &what, |rules| {
                rules.remove(&p).map(|_| ()).ok_or_else(|| crate::daemon::ApiError(404, format!("no firewall rule for {p}")))
            });
            return done(r.map(|_| ()), what);
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!(
                    "no such endpoint {method} {path:?}: POST /backends/<name>/state|weight, POST /vips, DELETE /vips/<name>, \
                     POST /vips/<name>/backends, DELETE /vips/<name>/backends/<backend>, POST /vips/<name>/allow, POST /firewall/deny|allow|reload, \
                     DELETE /firewall/<prefix>\n"
                ),
            )
        }
    };
    let result = match what.as_str() {
        "state" => match body.parse::<crate::daemon::AdminState>() {
            Ok(state) => crate::daemon::set_runtime(&shared, &name, |r| r.state = state),
            Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        },
        "weight" => {
            let weight = match body.as_str() {
                "config" => None,
                w => match w.parse::<u32>() {
                    Ok(w) if w <= crate::config::MAX_WEIGHT => Some(w),
                    _ => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("weight {body:?}: expected 0..=256 or config\n")),
                },
            };
            crate::daemon::set_runtime(&shared, &name, |r| r.weight = weight)
        }
        other => return reply(StatusCode::NOT_FOUND, "text/plain", format!("no such setting {other:?}: state or weight\n")),
    };
    match result {
        Ok(r) => reply(StatusCode::OK, "application/json", format!("{}\n", json!({"backend": name, "runtime": r}))),
        Err(e) if e.starts_with("no backend") => reply(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>, registry: Arc<Registry>) -> Result<Response<Body>, Infallible> {
    debug!(method = %req.method(), path = req.uri().path(), "admin request");
    if req.method() == Method::POST || req.method() == Method::DELETE {
        return Ok(mutate(req, shared).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", format!("{} is not allowed: GET to read, POST to change\n", req.method())));
    }
    Ok(match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" if shared.ready.load(Ordering::SeqCst) => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/status" => reply(StatusCode::OK, "application/json", format!("{:#}\n", status_json(&shared))),
        "/firewall" => reply(StatusCode::OK, "application/json", format!("{:#}\n", firewall_json(&shared))),
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "metrics encoding failed\n"),
            }
        }
        other => reply(StatusCode::NOT_FOUND, "text/plain", format!("no such endpoint {other:?}: try /metrics, /status, /firewall, /live, /ready\n")),
    })
}

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(LbCollector(shared.clone())));
    let registry = Arc::new(registry);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (shared, registry) = (shared.clone(), registry.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone(), registry.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
