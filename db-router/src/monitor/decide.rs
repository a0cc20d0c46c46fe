//! The monitor's decisions as a pure state machine: per-backend check results and the time go
//! in; actions (fence, promote), notes to log and the routing view come out. No I/O and no
//! clock, so every rule is unit-tested table-driven without MariaDB.
//!
//! Rules (MaxScale mariadbmon / orchestrator "holistic" detection):
//! - The primary is declared down after `fail_after` consecutive failed checks; the published
//!   primary is then `None` (sessions wait for a new one) until it answers again or a replica
//!   is promoted.
//! - Failover needs that AND every reachable replica confirming it lost the primary too
//!   (`Slave_IO_Running != Yes`), automatic failover on, and no failover within `anti_flap`.
//!   The most advanced replica (by received GTID) is promoted.
//! - Any reachable backend other than the primary that is writable (`read_only=OFF`) is
//!   fenced at once: a returning old primary never takes writes.
//! - Reads go to a replica only when it is reachable, both replication threads run and its
//!   lag is known and within `max_replication_lag`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::topology::Routing;

/// How long after a failed promotion the next attempt may start.
pub const PROMOTION_RETRY: Duration = Duration::from_secs(1);

/// Decision parameters (from [`super::MonitorConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub fail_after: u32,
    pub max_replication_lag: Option<Duration>,
    pub anti_flap: Duration,
    pub auto_failover: bool,
}

/// One poll of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Check {
    pub reachable: bool,
    /// Why the check failed (connect or query error).
    pub error: Option<String>,
    pub read_only: bool,
    pub gtid_binlog_pos: String,
    pub gtid_current_pos: String,
    pub gtid_slave_pos: String,
    /// `SHOW SLAVE STATUS`; `None` when the backend replicates from nobody.
    pub replication: Option<Replication>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Replication {
    /// `Master_Host:Master_Port`.
    pub source: String,
    /// `Slave_IO_Running`: `Yes`, `Connecting` or `No`.
    pub io_running: String,
    pub sql_running: bool,
    pub seconds_behind_master: Option<u64>,
    pub gtid_io_pos: String,
    pub last_io_error: String,
    pub last_sql_error: String,
}

impl Replication {
    pub fn io_connected(&self) -> bool {
        self.io_running == "Yes"
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `SET GLOBAL read_only=ON` on this backend.
    Fence(usize),
    /// Apply what it received, stop replicating, make it writable; then report back with
    /// [`Decider::promoted`] or [`Decider::promotion_failed`].
    Promote(usize),
}

/// Things worth a log line and a metric (emitted once per change, not per tick).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The first checks showed a different writable primary than configured.
    Discovered { primary: usize },
    PrimaryDown { primary: usize, failures: u32 },
    PrimaryBack { primary: usize },
    FailoverBlocked { reason: String },
}

/// The backend roles shown in `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    /// Neither primary nor replicating: a fenced old primary waiting for a rejoin.
    Stale,
    /// Not the primary and unreachable.
    Down,
}

#[derive(Debug)]
pub struct Decider {
    policy: Policy,
    addrs: Vec<SocketAddr>,
    primary: usize,
    primary_down: bool,
    failures: Vec<u32>,
    discovered: bool,
    last_failover: Option<Instant>,
    /// After a failed promotion, the next attempt waits until then.
    retry_promotion_at: Option<Instant>,
    last_block: Option<String>,
    published_primary: Option<SocketAddr>,
    generation: u64,
}

/// What one tick decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub actions: Vec<Action>,
    pub notes: Vec<Note>,
}

/// Which of several GTID positions is furthest, for the single-domain setups this project
/// builds: the highest sequence number in domain 0 (then any domain).
fn gtid_seq(pos: &str) -> u64 {
    pos.split(',')
        .filter_map(|g| g.trim().rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

impl Decider {
    /// `addrs[0]` is the configured primary.
    pub fn new(policy: Policy, addrs: Vec<SocketAddr>) -> Self {
        assert!(!addrs.is_empty(), "the monitor needs at least one backend");
        let n = addrs.len();
        Self {
            policy,
            addrs,
            primary: 0,
            primary_down: false,
            failures: vec![0; n],
            discovered: false,
            last_failover: None,
            retry_promotion_at: None,
            last_block: None,
            published_primary: None,
            generation: 0,
        }
    }

    /// Continues from a routing view already published (keeps its generation).
    pub fn resume_from(&mut self, r: &Routing) {
        self.published_primary = r.primary;
        self.generation = r.generation;
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
    pub fn primary(&self) -> usize {
        self.primary
    }
    pub fn primary_down(&self) -> bool {
        self.primary_down
    }
    pub fn failures(&self, i: usize) -> u32 {
        self.failures[i]
    }
    pub fn last_failover(&self) -> Option<Instant> {
        self.last_failover
    }

    /// Decides on one round of checks (`checks[i]` is backend `i`).
    pub fn tick(&mut self, now: Instant, checks: &[Check]) -> Tick {
        assert_eq!(checks.len(), self.addrs.len(), "one check per backend");
        let mut t = Tick::default();
        if !self.discovered && checks.iter().any(|c| c.reachable) {
            self.discovered = true;
            let writable: Vec<usize> = (0..checks.len())
                .filter(|&i| checks[i].reachable && !checks[i].read_only && checks[i].replication.is_none())
                .collect();
            if !writable.contains(&self.primary) && writable.len() == 1 {
                self.primary = writable[0];
                t.notes.push(Note::Discovered { primary: self.primary });
            }
        }
        for (i, c) in checks.iter().enumerate() {
            self.failures[i] = if c.reachable { 0 } else { self.failures[i].saturating_add(1) };
        }
        let p = self.primary;
        if checks[p].reachable {
            if self.primary_down {
                self.primary_down = false;
                self.last_block = None;
                t.notes.push(Note::PrimaryBack { primary: p });
            }
        } else if !self.primary_down && self.failures[p] >= self.policy.fail_after.max(1) {
            self.primary_down = true;
            t.notes.push(Note::PrimaryDown { primary: p, failures: self.failures[p] });
        }
        if self.primary_down {
            match self.failover_candidate(now, checks) {
                Ok(c) => {
                    self.last_block = None;
                    t.actions.push(Action::Promote(c));
                }
                Err(reason) => {
                    if self.last_block.as_ref() != Some(&reason) {
                        self.last_block = Some(reason.clone());
                        t.notes.push(Note::FailoverBlocked { reason });
                    }
                }
            }
        }
        for (i, c) in checks.iter().enumerate() {
            if i != p && c.reachable && !c.read_only {
                t.actions.push(Action::Fence(i));
            }
        }
        t
    }

    fn failover_candidate(&self, now: Instant, checks: &[Check]) -> Result<usize, String> {
        let p = self.primary;
        let replicas: Vec<usize> =
            (0..checks.len()).filter(|&i| i != p && checks[i].reachable && checks[i].replication.is_some()).collect();
        if replicas.is_empty() {
            return Err("no reachable replica to promote".into());
        }
        if let Some(&i) = replicas.iter().find(|&&i| checks[i].replication.as_ref().is_some_and(Replication::io_connected)) {
            return Err(format!("replica {} still sees the primary: not confirmed dead", self.addrs[i]));
        }
        if !self.policy.auto_failover {
            return Err("automatic failover is off".into());
        }
        if self.retry_promotion_at.is_some_and(|at| now < at) {
            return Err(format!("the last promotion failed: retrying after {PROMOTION_RETRY:?}"));
        }
        if let Some(at) = self.last_failover {
            let since = now.saturating_duration_since(at);
            if since < self.policy.anti_flap {
                // No elapsed time in the text: a reason is noted only when it changes.
                return Err(format!(
                    "anti-flap: the last failover was less than {}s ago",
                    self.policy.anti_flap.as_secs()
                ));
            }
        }
        let seq = |i: usize| gtid_seq(&checks[i].replication.as_ref().map(|r| r.gtid_io_pos.clone()).unwrap_or_default());
        // First of the most advanced (stable order: configuration order breaks ties).
        let best = replicas.iter().copied().fold(replicas[0], |b, i| if seq(i) > seq(b) { i } else { b });
        Ok(best)
    }

    /// The promotion of `i` succeeded: it is the primary now.
    pub fn promoted(&mut self, i: usize, now: Instant) {
        self.retry_promotion_at = None;
        self.primary = i;
        self.primary_down = false;
        self.last_failover = Some(now);
        self.last_block = None;
        self.failures[i] = 0;
    }

    /// The promotion failed; a tick after [`PROMOTION_RETRY`] decides again (the primary
    /// stays down meanwhile).
    pub fn promotion_failed(&mut self, now: Instant) {
        self.retry_promotion_at = Some(now + PROMOTION_RETRY);
        self.last_block = None;
    }

    fn read_eligible(&self, i: usize, c: &Check) -> bool {
        let Some(r) = &c.replication else { return false };
        i != self.primary
            && c.reachable
            && r.io_connected()
            && r.sql_running
            && r.seconds_behind_master.is_some_and(|lag| {
                self.policy.max_replication_lag.is_none_or(|max| Duration::from_secs(lag) <= max)
            })
    }

    pub fn role(&self, i: usize, c: &Check) -> Role {
        if i == self.primary {
            Role::Primary
        } else if !c.reachable {
            Role::Down
        } else if c.replication.is_some() {
            Role::Replica
        } else {
            Role::Stale
        }
    }

    /// Whether backend `i` may serve reads now.
    pub fn serves_reads(&self, i: usize, c: &Check) -> bool {
        self.read_eligible(i, c)
    }

    /// The routing view after this tick's actions; `generation` bumps whenever the published
    /// primary changes.
    pub fn routing(&mut self, checks: &[Check]) -> Routing {
        let primary = (!self.primary_down).then_some(self.addrs[self.primary]);
        if primary != self.published_primary {
            self.published_primary = primary;
            self.generation += 1;
        }
        let replica = checks
            .iter()
            .enumerate()
            .filter(|(i, c)| self.read_eligible(*i, c))
            .min_by_key(|(_, c)| c.replication.as_ref().and_then(|r| r.seconds_behind_master))
            .map(|(i, _)| self.addrs[i]);
        let fail_after = self.policy.fail_after.max(1);
        let down = (0..self.addrs.len()).filter(|&i| self.failures[i] >= fail_after).map(|i| self.addrs[i]).collect();
        Routing { primary, replica, generation: self.generation, down }
    }

    /// Which backends a rejoin applies to (`target` given, or every stale one), and the
    /// primary they would follow; `Err` says why it does not apply.
    pub fn rejoin_plan(&self, checks: &[Check], target: Option<SocketAddr>) -> Result<(Vec<usize>, SocketAddr), String> {
        let target = match target {
            Some(addr) => Some((
                addr,
                self.addrs.iter().position(|a| *a == addr).ok_or_else(|| format!("{addr} is not a monitored backend"))?,
            )),
            None => None,
        };
        if self.primary_down {
            return Err("there is no healthy primary to rejoin to".into());
        }
        let primary = self.addrs[self.primary];
        let targets = match target {
            Some((addr, i)) => {
                if i == self.primary {
                    return Err(format!("{addr} is the primary"));
                }
                if !checks[i].reachable {
                    return Err(format!("{addr} is unreachable"));
                }
                if checks[i].replication.as_ref().is_some_and(|r| r.io_connected() && r.sql_running) {
                    return Err(format!("{addr} already replicates"));
                }
                vec![i]
            }
            None => {
                let stale: Vec<usize> = (0..checks.len())
                    .filter(|&i| i != self.primary && checks[i].reachable && checks[i].replication.is_none())
                    .collect();
                if stale.is_empty() {
                    return Err("no reachable backend needs a rejoin (all replicate or are down)".into());
                }
                stale
            }
        };
        Ok((targets, primary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 0;
    const R: usize = 1;

    fn addrs() -> Vec<SocketAddr> {
        vec!["127.0.0.1:3301".parse().unwrap(), "127.0.0.1:3302".parse().unwrap()]
    }

    fn policy() -> Policy {
        Policy {
            fail_after: 3,
            max_replication_lag: Some(Duration::from_secs(5)),
            anti_flap: Duration::from_secs(60),
            auto_failover: true,
        }
    }

    // Backend states, shorthand for the tables below.
    fn primary() -> Check {
        Check { reachable: true, read_only: false, gtid_binlog_pos: "0-1-10".into(), ..Default::default() }
    }
    fn down() -> Check {
        Check { reachable: false, error: Some("connection refused".into()), ..Default::default() }
    }
    fn replica(io: &str, sql: bool, lag: Option<u64>, io_pos: &str) -> Check {
        Check {
            reachable: true,
            read_only: true,
            replication: Some(Replication {
                io_running: io.into(),
                sql_running: sql,
                seconds_behind_master: lag,
                gtid_io_pos: io_pos.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    fn healthy() -> Check {
        replica("Yes", true, Some(0), "0-1-10")
    }
    fn orphaned() -> Check {
        replica("Connecting", true, None, "0-1-10")
    }
    fn writable_stale() -> Check {
        primary()
    }
    fn fenced_stale() -> Check {
        Check { read_only: true, ..primary() }
    }

    /// Runs rounds of checks from a fresh decider (one second apart) and returns the last
    /// tick and routing.
    fn run(policy: Policy, rounds: &[[Check; 2]]) -> (Decider, Tick, Routing) {
        let t0 = Instant::now();
        let mut d = Decider::new(policy, addrs());
        let mut last = (Tick::default(), Routing { primary: None, replica: None, generation: 0, down: Vec::new() });
        for (n, checks) in rounds.iter().enumerate() {
            let now = t0 + Duration::from_secs(n as u64);
            let tick = d.tick(now, checks);
            for a in &tick.actions {
                if let Action::Promote(i) = a {
                    d.promoted(*i, now);
                }
            }
            last = (tick, d.routing(checks));
        }
        (d, last.0, last.1)
    }

    fn a(i: usize) -> Option<SocketAddr> {
        Some(addrs()[i])
    }

    #[test]
    fn read_routing_table() {
        // (replica state, expected read replica)
        let cases: Vec<(&str, Check, Option<SocketAddr>)> = vec![
            ("healthy replica serves reads", healthy(), a(R)),
            ("lag at the limit is fine", replica("Yes", true, Some(5), ""), a(R)),
            ("lag over the limit", replica("Yes", true, Some(6), ""), None),
            ("lag unknown (NULL)", replica("Yes", true, None, ""), None),
            ("SQL thread stopped", replica("Yes", false, None, ""), None),
            ("IO thread reconnecting", replica("Connecting", true, Some(0), ""), None),
            ("IO thread stopped", replica("No", true, Some(0), ""), None),
            ("unreachable", down(), None),
            ("not replicating", fenced_stale(), None),
        ];
        for (what, r, want) in cases {
            let (_, _, routing) = run(policy(), &[[primary(), r]]);
            assert_eq!(routing.replica, want, "{what}");
            assert_eq!(routing.primary, a(P), "{what}");
        }
        let no_limit = Policy { max_replication_lag: None, ..policy() };
        let (_, _, routing) = run(no_limit, &[[primary(), replica("Yes", true, Some(3600), "")]]);
        assert_eq!(routing.replica, a(R), "no lag limit");
    }

    /// (description, policy, rounds of checks, expected primary, expected last actions)
    type FailoverCase = (&'static str, Policy, Vec<[Check; 2]>, Option<SocketAddr>, Vec<Action>);
    /// (description, checks, target, expected targets or error fragment)
    type RejoinCase = (&'static str, [Check; 2], Option<SocketAddr>, Result<Vec<usize>, &'static str>);

    #[test]
    fn failover_table() {
        let unconfirmed = [down(), healthy()];
        let confirmed = [down(), orphaned()];
        let cases: Vec<FailoverCase> = vec![
            ("healthy pair: no action", policy(), vec![[primary(), healthy()]], a(P), vec![]),
            ("two failures < fail_after: primary kept", policy(), vec![confirmed.clone(), confirmed.clone()], a(P), vec![]),
            ("three failures, replica confirms: promote", policy(), vec![confirmed.clone(); 3], a(R), vec![Action::Promote(R)]),
            (
                "replica still connected to the primary: no failover, no primary published",
                policy(),
                vec![unconfirmed.clone(); 5],
                None,
                vec![],
            ),
            ("replica unreachable too: no failover", policy(), vec![[down(), down()]; 5], None, vec![]),
            ("replica not replicating: no candidate", policy(), vec![[down(), fenced_stale()]; 5], None, vec![]),
            (
                "auto failover off",
                Policy { auto_failover: false, ..policy() },
                vec![confirmed.clone(); 5],
                None,
                vec![],
            ),
            (
                "primary recovers before fail_after",
                policy(),
                vec![confirmed.clone(), confirmed.clone(), [primary(), healthy()]],
                a(P),
                vec![],
            ),
            (
                "primary recovers after being declared down",
                policy(),
                vec![unconfirmed.clone(), unconfirmed.clone(), unconfirmed.clone(), [primary(), healthy()]],
                a(P),
                vec![],
            ),
            (
                "old primary returns writable after failover: fenced",
                policy(),
                vec![confirmed.clone(), confirmed.clone(), confirmed.clone(), [writable_stale(), primary()]],
                a(R),
                vec![Action::Fence(P)],
            ),
            (
                "fenced old primary: nothing more",
                policy(),
                vec![confirmed.clone(), confirmed.clone(), confirmed.clone(), [fenced_stale(), primary()]],
                a(R),
                vec![],
            ),
            (
                "writable replica is fenced",
                policy(),
                vec![[primary(), Check { read_only: false, ..healthy() }]],
                a(P),
                vec![Action::Fence(R)],
            ),
        ];
        for (what, pol, rounds, want_primary, want_actions) in cases {
            let (_, tick, routing) = run(pol, &rounds);
            assert_eq!(routing.primary, want_primary, "{what}");
            assert_eq!(tick.actions, want_actions, "{what}");
        }
    }

    #[test]
    fn anti_flap_blocks_a_second_failover_until_the_window_ends() {
        let t0 = Instant::now();
        let mut d = Decider::new(Policy { fail_after: 1, ..policy() }, addrs());
        let tick = d.tick(t0, &[down(), orphaned()]);
        assert_eq!(tick.actions, vec![Action::Promote(R)]);
        d.promoted(R, t0);
        // The new primary (backend 1) dies 10 s later; the rejoined old one confirms.
        let back = [orphaned(), down()];
        let tick = d.tick(t0 + Duration::from_secs(10), &back);
        assert!(tick.actions.is_empty());
        assert!(matches!(&tick.notes[..], [Note::PrimaryDown { primary: R, .. }, Note::FailoverBlocked { reason }] if reason.contains("anti-flap")), "{:?}", tick.notes);
        // The same reason is not repeated every tick.
        let tick = d.tick(t0 + Duration::from_secs(11), &back);
        assert!(tick.notes.is_empty() && tick.actions.is_empty(), "{tick:?}");
        let tick = d.tick(t0 + Duration::from_secs(61), &back);
        assert_eq!(tick.actions, vec![Action::Promote(P)]);
    }

    #[test]
    fn generation_bumps_on_every_change_of_the_published_primary() {
        let t0 = Instant::now();
        let mut d = Decider::new(Policy { fail_after: 1, ..policy() }, addrs());
        d.tick(t0, &[primary(), healthy()]);
        let g1 = d.routing(&[primary(), healthy()]);
        d.tick(t0, &[primary(), healthy()]);
        assert_eq!(d.routing(&[primary(), healthy()]), g1, "no change, same generation");
        let checks = [down(), healthy()];
        d.tick(t0, &checks);
        let g2 = d.routing(&checks);
        assert_eq!((g2.primary, g2.generation), (None, g1.generation + 1));
        let checks = [down(), orphaned()];
        let tick = d.tick(t0, &checks);
        assert_eq!(tick.actions, vec![Action::Promote(R)]);
        d.promoted(R, t0);
        let g3 = d.routing(&checks);
        assert_eq!((g3.primary, g3.generation), (a(R), g2.generation + 1));
    }

    #[test]
    fn backends_failing_fail_after_checks_in_a_row_are_listed_down() {
        let t0 = Instant::now();
        let mut d = Decider::new(policy(), addrs());
        let checks = [primary(), down()];
        for n in 1..=3 {
            d.tick(t0 + Duration::from_secs(n), &checks);
            let r = d.routing(&checks);
            assert_eq!(r.replica, None, "no reads on an unreachable replica, from the first failed check");
            let expect = if n >= u64::from(policy().fail_after) { vec![addrs()[R]] } else { vec![] };
            assert_eq!(r.down, expect, "after {n} failed checks");
            assert_eq!(r.takes_out(addrs()[R], crate::topology::ConnRole::Replica), !expect.is_empty());
            assert!(!r.takes_out(addrs()[P], crate::topology::ConnRole::Primary));
        }
        let checks = [primary(), healthy()];
        d.tick(t0 + Duration::from_secs(4), &checks);
        assert_eq!(d.routing(&checks).down, vec![], "back on its first good check");
    }

    #[test]
    fn promotion_failure_is_retried() {
        let t0 = Instant::now();
        let mut d = Decider::new(Policy { fail_after: 1, ..policy() }, addrs());
        let checks = [down(), orphaned()];
        assert_eq!(d.tick(t0, &checks).actions, vec![Action::Promote(R)]);
        d.promotion_failed(t0);
        assert_eq!(d.routing(&checks).primary, None);
        let tick = d.tick(t0 + PROMOTION_RETRY / 2, &checks);
        assert!(tick.actions.is_empty(), "{tick:?}");
        assert!(matches!(&tick.notes[..], [Note::FailoverBlocked { reason }] if reason.contains("last promotion failed")));
        assert_eq!(d.tick(t0 + PROMOTION_RETRY, &checks).actions, vec![Action::Promote(R)]);
    }

    #[test]
    fn discovery_adopts_the_only_writable_backend() {
        // The router restarted after a failover: backend 1 is the primary now.
        let (d, tick, routing) = run(policy(), &[[replica("Yes", true, Some(0), ""), primary()]]);
        assert_eq!(tick.notes, vec![Note::Discovered { primary: R }]);
        assert_eq!((d.primary(), routing.primary, routing.replica), (R, a(R), a(P)));
        // Two writable backends: keep the configured one and fence the other.
        let (d, tick, _) = run(policy(), &[[primary(), writable_stale()]]);
        assert_eq!((d.primary(), tick.actions), (P, vec![Action::Fence(R)]));
    }

    #[test]
    fn roles_for_status() {
        let d = Decider::new(policy(), addrs());
        let cases = [
            (P, down(), Role::Primary),
            (R, healthy(), Role::Replica),
            (R, replica("No", false, None, ""), Role::Replica),
            (R, fenced_stale(), Role::Stale),
            (R, down(), Role::Down),
        ];
        for (i, check, want) in cases {
            assert_eq!(d.role(i, &check), want, "{check:?}");
        }
    }

    #[test]
    fn most_advanced_replica_is_promoted() {
        let three: Vec<SocketAddr> = (1..=3).map(|n| format!("127.0.0.1:330{n}").parse().unwrap()).collect();
        let mut d = Decider::new(Policy { fail_after: 1, ..policy() }, three);
        let checks = [
            down(),
            replica("Connecting", true, None, "0-1-7"),
            replica("Connecting", true, None, "0-1-9"),
        ];
        assert_eq!(d.tick(Instant::now(), &checks).actions, vec![Action::Promote(2)]);
        assert_eq!(gtid_seq("0-1-9,1-2-3"), 9);
        assert_eq!(gtid_seq(""), 0);
    }

    #[test]
    fn rejoin_plan_table() {
        let old = addrs()[P];
        let mut d = Decider::new(Policy { fail_after: 1, ..policy() }, addrs());
        let t0 = Instant::now();
        let checks = [down(), orphaned()];
        d.tick(t0, &checks);
        assert!(d.rejoin_plan(&checks, None).unwrap_err().contains("no healthy primary"));
        d.promoted(R, t0);
        let cases: Vec<RejoinCase> = vec![
            ("old primary down", [down(), primary()], None, Err("no reachable backend")),
            ("old primary back, fenced", [fenced_stale(), primary()], None, Ok(vec![P])),
            ("named target", [fenced_stale(), primary()], Some(old), Ok(vec![P])),
            ("target is the primary", [fenced_stale(), primary()], a(R), Err("is the primary")),
            ("target unknown", [fenced_stale(), primary()], Some("10.0.0.1:1".parse().unwrap()), Err("not a monitored")),
            ("target unreachable", [down(), primary()], Some(old), Err("unreachable")),
            ("already replicating", [healthy(), primary()], Some(old), Err("already replicates")),
            ("broken replica may rejoin again", [replica("No", false, None, ""), primary()], Some(old), Ok(vec![P])),
        ];
        for (what, checks, target, want) in cases {
            match (d.rejoin_plan(&checks, target), want) {
                (Ok((targets, primary)), Ok(want)) => {
                    assert_eq!((targets, primary), (want, addrs()[R]), "{what}")
                }
                (Err(e), Err(want)) => assert!(e.contains(want), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }
}
