//! The monitor: polls every backend, publishes the [`Routing`] view, fails over, fences and
//! rejoins.
//!
//! - [`decide`]: the decision rules as a pure state machine (unit-tested without MariaDB).
//! - [`probe`]: the I/O (mysql_async as the monitor account, every call bounded).
//! - this file: configuration, the task that runs rounds (poll all backends in parallel,
//!   decide, act, publish), logs, metrics, the `/status` snapshot and the rejoin command.
//!
//! One task owns the decider and the connections, so checks, failover and rejoin never race;
//! [`MonitorHandle`] talks to it through a channel.

pub mod decide;
pub mod probe;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::topology::Publisher;
use decide::{Action, Check, Decider, Note, Policy, Role};
use probe::Prober;

/// `[monitor]` in the router's configuration. Every field has a default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Time between polling rounds.
    pub interval_ms: u64,
    pub connect_timeout_ms: u64,
    pub query_timeout_ms: u64,
    /// Consecutive failed checks before the primary is declared down.
    pub fail_after: u32,
    /// A replica further behind (`Seconds_Behind_Master`) gets no reads; unset: no limit.
    pub max_replication_lag_s: Option<u64>,
    pub auto_failover: bool,
    /// No second automatic failover within this window after one.
    pub anti_flap_s: u64,
    /// How long a promotion waits for the candidate to apply what it received.
    pub promote_apply_timeout_ms: u64,
    /// The monitor account (see `tier::MONITOR` for its privileges).
    pub user: String,
    pub password: String,
    /// The account a rejoined backend replicates with (`REPLICATION SLAVE`).
    pub replication_user: String,
    pub replication_password: String,
    /// Check the servers over TLS: the top-level `backend_tls_ca` (and server name), copied
    /// here by the configuration loader, so that servers may require TLS of the monitor.
    #[serde(skip)]
    pub tls: Option<crate::tls::BackendTls>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 250,
            connect_timeout_ms: 1000,
            query_timeout_ms: 2000,
            fail_after: 3,
            max_replication_lag_s: Some(10),
            auto_failover: true,
            anti_flap_s: 60,
            promote_apply_timeout_ms: 10_000,
            user: crate::tier::MONITOR.user.into(),
            password: crate::tier::MONITOR.password.into(),
            replication_user: crate::tier::REPL.user.into(),
            replication_password: crate::tier::REPL.password.into(),
            tls: None,
        }
    }
}

impl MonitorConfig {
    /// Rejects values the monitor cannot work with; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("interval_ms", self.interval_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("query_timeout_ms", self.query_timeout_ms),
            ("fail_after", u64::from(self.fail_after)),
            ("promote_apply_timeout_ms", self.promote_apply_timeout_ms),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("monitor.{key} must be at least 1"));
        }
        if self.user.is_empty() {
            return Err("monitor.user must not be empty".into());
        }
        if self.replication_user.is_empty() {
            return Err("monitor.replication_user must not be empty".into());
        }
        Ok(())
    }

    fn policy(&self) -> Policy {
        Policy {
            fail_after: self.fail_after,
            max_replication_lag: self.max_replication_lag_s.map(Duration::from_secs),
            anti_flap: Duration::from_secs(self.anti_flap_s),
            auto_failover: self.auto_failover,
        }
    }
}

/// One backend in `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    pub role: Role,
    pub serves_reads: bool,
    pub consecutive_failures: u32,
    /// The last poll: reachability, read_only, GTID positions, replication threads and lag.
    pub check: Check,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailoverRecord {
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// Seconds since the Unix epoch.
    pub at_unix_s: u64,
    /// From the primary's first failed check to the new primary being published.
    pub downtime_ms: u64,
    /// The GTID position the new primary applied before it was made writable.
    pub applied_gtid: String,
}

/// A snapshot for `/status` and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub primary: Option<SocketAddr>,
    pub replica: Option<SocketAddr>,
    pub generation: u64,
    pub primary_down: bool,
    /// Polling rounds done so far.
    pub rounds: u64,
    pub failovers: u64,
    pub last_failover: Option<FailoverRecord>,
    /// Why an automatic failover is not happening now, if one is wanted.
    pub failover_blocked: Option<String>,
    /// The error of the last failed promotion (cleared by a successful one).
    pub last_promotion_error: Option<String>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RejoinReport {
    pub primary: SocketAddr,
    pub rejoined: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejoinError {
    /// Nothing to rejoin, or the target is not eligible (a client error: HTTP 409).
    #[error("rejoin not applicable: {0}")]
    NotApplicable(String),
    /// The statements failed on the backend.
    #[error("rejoin of {backend} failed: {reason}")]
    Failed { backend: SocketAddr, reason: String },
    #[error("the monitor is not running")]
    Stopped,
}

enum Command {
    Rejoin { target: Option<SocketAddr>, reply: oneshot::Sender<Result<RejoinReport, RejoinError>> },
}

/// Talks to the monitor task. The task stops once the last handle is dropped and the last
/// routing subscriber is gone.
#[derive(Clone, Debug)]
pub struct MonitorHandle {
    status: Arc<Mutex<Status>>,
    commands: mpsc::Sender<Command>,
}

impl MonitorHandle {
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Makes `target` (or every reachable backend that is neither primary nor replicating,
    /// e.g. a fenced old primary) a replica of the current primary.
    pub async fn rejoin(&self, target: Option<SocketAddr>) -> Result<RejoinReport, RejoinError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Rejoin { target, reply }).await.map_err(|_| RejoinError::Stopped)?;
        rx.await.map_err(|_| RejoinError::Stopped)?
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Rejoin { target, .. } => write!(f, "Rejoin({target:?})"),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

struct Metrics {
    up: Family<Labels, Gauge>,
    read_only: Family<Labels, Gauge>,
    primary: Family<Labels, Gauge>,
    serves_reads: Family<Labels, Gauge>,
    lag: Family<Labels, Gauge>,
    checks: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    generation: Gauge,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            up: Family::default(),
            read_only: Family::default(),
            primary: Family::default(),
            serves_reads: Family::default(),
            lag: Family::default(),
            checks: Family::default(),
            events: Family::default(),
            generation: Gauge::default(),
        };
        let r = registry;
        r.register("db_router_monitor_backend_up", "1 when the last check of the backend succeeded", m.up.clone());
        r.register("db_router_monitor_backend_read_only", "The backend's read_only", m.read_only.clone());
        r.register("db_router_monitor_backend_primary", "1 for the published primary", m.primary.clone());
        r.register("db_router_monitor_backend_serves_reads", "1 for the replica that gets reads", m.serves_reads.clone());
        r.register(
            "db_router_monitor_replication_lag_seconds",
            "Seconds_Behind_Master of a replica (-1: unknown or not replicating)",
            m.lag.clone(),
        );
        r.register("db_router_monitor_checks", "Backend checks, by result (ok, error)", m.checks.clone());
        r.register(
            "db_router_monitor_events",
            "Monitor events: primary_down, primary_back, failover_blocked, failover, failover_failed, fence, \
             fence_failed, rejoin, rejoin_failed, discovered",
            m.events.clone(),
        );
        r.register("db_router_monitor_routing_generation", "Generation of the published routing view", m.generation.clone());
        m
    }

    fn event(&self, name: &str) {
        self.events.get_or_create(&vec![("event", name.to_string())]).inc();
    }
}

/// Starts the monitor on the current tokio runtime. `backends[0]` is the initial primary.
pub struct Monitor;

impl Monitor {
    pub fn spawn(cfg: MonitorConfig, backends: Vec<SocketAddr>, publisher: Publisher, registry: &mut Registry) -> MonitorHandle {
        assert!(!backends.is_empty(), "the monitor needs at least one backend");
        let metrics = Metrics::register(registry);
        let connect = Duration::from_millis(cfg.connect_timeout_ms);
        let query = Duration::from_millis(cfg.query_timeout_ms);
        let probers = backends.iter().map(|&a| Some(Prober::new(a, &cfg.user, &cfg.password, connect, query, cfg.tls.as_ref()))).collect();
        let mut decider = Decider::new(cfg.policy(), backends.clone());
        decider.resume_from(&publisher.borrow());
        let status = Arc::new(Mutex::new(Status::default()));
        let (tx, rx) = mpsc::channel(8);
        let task = Task {
            checks: vec![Check::default(); backends.len()],
            cfg,
            probers,
            decider,
            publisher,
            metrics,
            status: Arc::clone(&status),
            commands: rx,
            rounds: 0,
            failovers: 0,
            last_failover: None,
            blocked: None,
            last_promotion_error: None,
            primary_failing_since: None,
        };
        tokio::spawn(task.run());
        MonitorHandle { status, commands: tx }
    }
}

struct Task {
    cfg: MonitorConfig,
    probers: Vec<Option<Prober>>,
    checks: Vec<Check>,
    decider: Decider,
    publisher: Publisher,
    metrics: Metrics,
    status: Arc<Mutex<Status>>,
    commands: mpsc::Receiver<Command>,
    rounds: u64,
    failovers: u64,
    last_failover: Option<FailoverRecord>,
    blocked: Option<String>,
    last_promotion_error: Option<String>,
    primary_failing_since: Option<Instant>,
}

impl Task {
    /// Runs until every handle is dropped and nobody reads the routing view any more.
    async fn run(mut self) {
        let mut interval = tokio::time::interval(Duration::from_millis(self.cfg.interval_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut handles_gone = false;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if handles_gone && self.publisher.is_closed() {
                        break;
                    }
                    self.round().await;
                }
                cmd = self.commands.recv(), if !handles_gone => match cmd {
                    Some(Command::Rejoin { target, reply }) => {
                        let result = self.rejoin(target).await;
                        let _ = reply.send(result);
                    }
                    None => handles_gone = true,
                },
            }
        }
        info!("monitor stopped: no handle and no reader left");
    }

    /// Polls every backend in parallel (each prober moves into its own task and comes back).
    async fn poll(&mut self) {
        let mut set = tokio::task::JoinSet::new();
        for (i, slot) in self.probers.iter_mut().enumerate() {
            let mut p = slot.take().expect("prober is home between rounds");
            set.spawn(async move {
                let c = p.check().await;
                (i, p, c)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (i, p, c) = joined.expect("check task panicked");
            self.probers[i] = Some(p);
            self.checks[i] = c;
        }
    }

    fn prober(&mut self, i: usize) -> &mut Prober {
        self.probers[i].as_mut().expect("prober is home between rounds")
    }

    async fn round(&mut self) {
        self.poll().await;
        self.rounds += 1;
        let now = Instant::now();
        let addrs = self.decider.addrs().to_vec();
        for (i, c) in self.checks.iter().enumerate() {
            let result = if c.reachable { "ok" } else { "error" };
            self.metrics.checks.get_or_create(&vec![("backend", addrs[i].to_string()), ("result", result.into())]).inc();
        }
        let p = self.decider.primary();
        if self.checks[p].reachable {
            self.primary_failing_since = None;
        } else if self.primary_failing_since.is_none() {
            self.primary_failing_since = Some(now);
            warn!(backend = %addrs[p], error = ?self.checks[p].error, "primary check failed");
        }
        let tick = self.decider.tick(now, &self.checks);
        for note in tick.notes {
            self.note(note, &addrs);
        }
        for action in tick.actions {
            match action {
                Action::Fence(i) => {
                    warn!(backend = %addrs[i], "fencing a writable backend that is not the primary: SET GLOBAL read_only=ON");
                    match self.prober(i).fence().await {
                        Ok(()) => {
                            self.metrics.event("fence");
                            self.checks[i].read_only = true;
                            info!(backend = %addrs[i], "fenced");
                        }
                        Err(e) => {
                            self.metrics.event("fence_failed");
                            error!(backend = %addrs[i], error = %e, "fencing failed");
                        }
                    }
                }
                Action::Promote(i) => self.promote(i, &addrs).await,
            }
        }
        self.publish();
    }

    fn note(&mut self, note: Note, addrs: &[SocketAddr]) {
        match note {
            Note::Discovered { primary } => {
                self.metrics.event("discovered");
                warn!(backend = %addrs[primary], "the only writable, non-replicating backend is not the configured primary: following it");
            }
            Note::PrimaryDown { primary, failures } => {
                self.metrics.event("primary_down");
                error!(backend = %addrs[primary], failures, "primary declared down; writes wait for a new primary");
            }
            Note::PrimaryBack { primary } => {
                self.metrics.event("primary_back");
                self.blocked = None;
                info!(backend = %addrs[primary], "primary answers again");
            }
            Note::FailoverBlocked { reason } => {
                self.metrics.event("failover_blocked");
                warn!(%reason, "no automatic failover");
                self.blocked = Some(reason);
            }
        }
    }

    async fn promote(&mut self, i: usize, addrs: &[SocketAddr]) {
        let old = addrs[self.decider.primary()];
        let timeout = Duration::from_millis(self.cfg.promote_apply_timeout_ms);
        info!(from = %old, to = %addrs[i], "failover: promoting the replica after it applies what it received");
        let started = Instant::now();
        match self.prober(i).promote(timeout).await {
            Ok(applied) => {
                let now = Instant::now();
                self.decider.promoted(i, now);
                self.failovers += 1;
                self.blocked = None;
                self.last_promotion_error = None;
                self.metrics.event("failover");
                let downtime = self.primary_failing_since.map_or(Duration::ZERO, |s| now.duration_since(s));
                self.primary_failing_since = None;
                self.checks[i].read_only = false;
                self.checks[i].replication = None;
                info!(
                    from = %old, to = %addrs[i], applied = %applied,
                    promotion_ms = started.elapsed().as_millis() as u64,
                    downtime_ms = downtime.as_millis() as u64,
                    "failover done: new primary is writable"
                );
                self.last_failover = Some(FailoverRecord {
                    from: old,
                    to: addrs[i],
                    at_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    downtime_ms: downtime.as_millis() as u64,
                    applied_gtid: applied,
                });
            }
            Err(e) => {
                self.decider.promotion_failed(Instant::now());
                self.metrics.event("failover_failed");
                error!(candidate = %addrs[i], error = %e, "promotion failed; retrying in {:?}", decide::PROMOTION_RETRY);
                self.last_promotion_error = Some(format!("promotion of {} failed: {e}", addrs[i]));
            }
        }
    }

    async fn rejoin(&mut self, target: Option<SocketAddr>) -> Result<RejoinReport, RejoinError> {
        let (targets, primary) =
            self.decider.rejoin_plan(&self.checks, target).map_err(RejoinError::NotApplicable)?;
        let (user, password) = (self.cfg.replication_user.clone(), self.cfg.replication_password.clone());
        let mut rejoined = Vec::new();
        for i in targets {
            let backend = self.decider.addrs()[i];
            info!(%backend, %primary, "rejoin: making it a replica of the primary");
            if let Err(reason) = self.prober(i).rejoin(primary, &user, &password).await {
                self.metrics.event("rejoin_failed");
                error!(%backend, error = %reason, "rejoin failed");
                return Err(RejoinError::Failed { backend, reason });
            }
            self.metrics.event("rejoin");
            info!(%backend, %primary, "rejoined; it serves reads once it has caught up");
            rejoined.push(backend);
        }
        // See the result at once rather than at the next round.
        self.round().await;
        Ok(RejoinReport { primary, rejoined })
    }

    /// Updates `/status` and the metrics, then publishes the routing view (in that order, so
    /// whoever wakes on a routing change sees a status at least as new).
    fn publish(&mut self) {
        let routing = self.decider.routing(&self.checks);
        let addrs = self.decider.addrs().to_vec();
        let mut backends = Vec::with_capacity(addrs.len());
        for (i, c) in self.checks.iter().enumerate() {
            let label = vec![("backend", addrs[i].to_string())];
            let serves_reads = routing.replica == Some(addrs[i]);
            self.metrics.up.get_or_create(&label).set(i64::from(c.reachable));
            self.metrics.read_only.get_or_create(&label).set(i64::from(c.read_only));
            self.metrics.primary.get_or_create(&label).set(i64::from(routing.primary == Some(addrs[i])));
            self.metrics.serves_reads.get_or_create(&label).set(i64::from(serves_reads));
            let lag = c.replication.as_ref().and_then(|r| r.seconds_behind_master).map_or(-1, |l| l as i64);
            self.metrics.lag.get_or_create(&label).set(lag);
            backends.push(BackendStatus {
                addr: addrs[i],
                role: self.decider.role(i, c),
                serves_reads,
                consecutive_failures: self.decider.failures(i),
                check: c.clone(),
            });
        }
        self.metrics.generation.set(routing.generation as i64);
        *self.status.lock().expect("status lock") = Status {
            primary: routing.primary,
            replica: routing.replica,
            generation: routing.generation,
            primary_down: self.decider.primary_down(),
            rounds: self.rounds,
            failovers: self.failovers,
            last_failover: self.last_failover.clone(),
            failover_blocked: self.blocked.clone(),
            last_promotion_error: self.last_promotion_error.clone(),
            backends,
        };
        let changed = self.publisher.send_if_modified(|r| {
            if *r == routing {
                false
            } else {
                *r = routing.clone();
                true
            }
        });
        if changed {
            info!(primary = ?routing.primary, replica = ?routing.replica, generation = routing.generation, "routing changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg: MonitorConfig = toml::from_str("interval_ms = 100\nfail_after = 2").unwrap();
        assert_eq!((cfg.interval_ms, cfg.fail_after, cfg.anti_flap_s), (100, 2, 60));
        assert!(cfg.validate().is_ok());
        let err = toml::from_str::<MonitorConfig>("intervall_ms = 100").unwrap_err().to_string();
        assert!(err.contains("intervall_ms"), "{err}");
        let cfg = MonitorConfig { fail_after: 0, ..Default::default() };
        assert_eq!(cfg.validate().unwrap_err(), "monitor.fail_after must be at least 1");
    }
}
