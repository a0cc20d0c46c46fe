//! `lbd deploy`: a rolling deploy of a web release over the balancer's backends, one node at
//! a time, so that the VIP never stops serving.
//!
//! For each node in plan order: drain it at the balancers (no new flows; pinned flows go on),
//! wait until its traffic stops (bounded: keep-alive connections may never end, and the
//! node's reload does not close them), switch its `current` release symlink atomically,
//! reload it, wait until it is healthy *and* reports the new release, put it back and wait
//! until the balancer's health checks see it up. If a node does not come up healthy on the
//! new release, it is switched back and reloaded, and so is every node done before it:
//! the deploy stops with every node on the release it had.
//!
//! Before touching anything, the release must exist on every node and pass the plan's
//! `verify` command (e.g. `web-app release verify`): a corrupted release changes nothing.
//!
//! The release layout is the web node's (`web-app --releases DIR`): `DIR/<version>/` holds a
//! release, `DIR/current` is a symlink to the active one.
//!
//! ```toml
//! admin = "127.0.0.1:9100"            # the lbd admin API; a list for active-active balancers,
//!                                     # e.g. ["10.0.0.2:9100", "10.0.0.3:9100"] (one token for all)
//! token_file = "/run/lbd/admin.token"
//! verify = ["web-app", "release", "verify"]   # optional; the release directory is appended
//! drain_timeout_ms = 10000            # wait at most this long for a drained node's traffic to stop
//! quiet_ms = 500                      # no packets for this long: drained
//! health_timeout_ms = 20000           # a reloaded node must be healthy on the new release by then
//!
//! [[node]]
//! backend = "web1"                    # its name in lbd
//! releases = "/srv/web1/releases"
//! url = "http://10.0.0.11:80"         # GET /healthz (200) and /whoami ("release") are read here
//! reload = ["systemctl", "reload", "web-app"]   # e.g. ["kill", "-HUP", "<pid>"]
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hyper::Method;
use serde::Deserialize;
use serde_spanned::Spanned;

use crate::{
    client,
    config::{ConfigError, Ctx},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    admin: Spanned<OneOrMany>,
    token_file: String,
    #[serde(default)]
    verify: Option<Vec<String>>,
    #[serde(default)]
    drain_timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    quiet_ms: Option<Spanned<u64>>,
    #[serde(default)]
    health_timeout_ms: Option<Spanned<u64>>,
    node: Spanned<Vec<NodeFile>>,
}

/// `admin`: one balancer's admin API, or a list (balancers sharing the traffic: a node is
/// drained, and back, at each of them).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    backend: Spanned<String>,
    releases: String,
    url: Spanned<String>,
    reload: Spanned<Vec<String>>,
}

/// A validated deploy plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every balancer's admin API: the node states are set at each.
    pub admins: Vec<SocketAddr>,
    pub token_file: PathBuf,
    pub verify: Option<Vec<String>>,
    pub drain_timeout: Duration,
    pub quiet: Duration,
    pub health_timeout: Duration,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub backend: String,
    pub releases: PathBuf,
    /// `http://host:port`, no trailing slash.
    pub url: String,
    pub reload: Vec<String>,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { file: path.display().to_string(), line: None, message: format!("cannot read: {e}") })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Plan, ConfigError> {
        let cx = Ctx { file, text };
        let f: PlanFile = toml::from_str(text).map_err(|e| cx.toml_error(e))?;
        let list = match f.admin.get_ref() {
            OneOrMany::One(a) => vec![a.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        if list.is_empty() {
            return cx.err(f.admin.span(), "admin is empty: give each balancer's admin address:port");
        }
        let mut admins: Vec<SocketAddr> = Vec::new();
        for a in &list {
            let addr = a.parse().or_else(|_| cx.err(f.admin.span(), format!("admin {a:?} is not an address:port")))?;
            if admins.contains(&addr) {
                return cx.err(f.admin.span(), format!("admin {addr} listed twice"));
            }
            admins.push(addr);
        }
        let ms = |v: &Option<Spanned<u64>>, name: &str, default: u64| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(Duration::from_millis(default)),
                Some(x) if (1..=3_600_000).contains(x.get_ref()) => Ok(Duration::from_millis(*x.get_ref())),
                Some(x) => cx.err(x.span(), format!("{name} {} is out of range 1..=3600000", x.get_ref())),
            }
        };
        if f.node.get_ref().is_empty() {
            return cx.err(f.node.span(), "no [[node]]: a plan deploys to at least one node");
        }
        let mut nodes: Vec<Node> = Vec::new();
        for n in f.node.get_ref() {
            if nodes.iter().any(|o| o.backend == *n.backend.get_ref()) {
                return cx.err(n.backend.span(), format!("node {:?} listed twice", n.backend.get_ref()));
            }
            let url = n.url.get_ref().trim_end_matches('/').to_string();
            if !url.starts_with("http://") {
                return cx.err(n.url.span(), format!("url {url:?}: expected http://host:port"));
            }
            if n.reload.get_ref().is_empty() {
                return cx.err(n.reload.span(), "reload is empty: give the command that reloads this node");
            }
            nodes.push(Node { backend: n.backend.get_ref().clone(), releases: n.releases.clone().into(), url, reload: n.reload.get_ref().clone() });
        }
        if let Some(v) = &f.verify {
            if v.is_empty() {
                return Err(ConfigError { file: file.into(), line: None, message: "verify is empty: omit it or give a command".into() });
            }
        }
        Ok(Plan {
            admins,
            token_file: f.token_file.into(),
            verify: f.verify,
            drain_timeout: ms(&f.drain_timeout_ms, "drain_timeout_ms", 10_000)?,
            quiet: ms(&f.quiet_ms, "quiet_ms", 500)?,
            health_timeout: ms(&f.health_timeout_ms, "health_timeout_ms", 20_000)?,
            nodes,
        })
    }
}

/// The release a node's `current` symlink points at.
pub fn current_release(releases: &Path) -> Result<String> {
    let link = releases.join("current");
    let target = std::fs::read_link(&link).with_context(|| format!("{}: not a symlink to a release", link.display()))?;
    Ok(target.file_name().context("empty release link")?.to_string_lossy().into_owned())
}

/// Points `releases/current` at `version` atomically: a new symlink renamed over the old
/// one, so a reader sees either release, never none.
pub fn switch_release(releases: &Path, version: &str) -> Result<()> {
    let tmp = releases.join(format!(".current.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, releases.join("current")).with_context(|| format!("switching {}/current", releases.display()))
}

fn run(cmd: &[String], extra: Option<&Path>) -> Result<()> {
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    if let Some(p) = extra {
        c.arg(p);
    }
    let out = c.output().with_context(|| format!("cannot run {}", cmd[0]))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}{}", cmd.join(" "), out.status, String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

struct Deployer<'a> {
    plan: &'a Plan,
    token: String,
    say: &'a mut dyn FnMut(String),
}

impl Deployer<'_> {
    async fn status(&self, admin: SocketAddr) -> Result<serde_json::Value> {
        let body = client::get_ok(&format!("http://{admin}/status")).await.with_context(|| format!("lbd admin API {admin}"))?;
        serde_json::from_str(&body).context("lbd /status is not JSON")
    }

    /// `(packets, health state, admin state)` of a backend (its first VIP membership) over
    /// every balancer: packets summed, "up" when every balancer sees it up.
    async fn backend(&self, name: &str) -> Result<(u64, String, String)> {
        let mut total: Option<(u64, String, String)> = None;
        for &admin in &self.plan.admins {
            let s = self.status(admin).await?;
            let found = s["vips"].as_array().into_iter().flatten().flat_map(|v| v["backends"].as_array().into_iter().flatten()).find(|b| b["name"] == name);
            let Some(b) = found else { bail!("lbd at {admin} has no backend named {name:?}") };
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let (packets, state, admin_state) = (b["packets"].as_u64().unwrap_or(0), text(&b["state"]), text(&b["admin_state"]));
            total = Some(match total {
                None => (packets, state, admin_state),
                Some((p, s, a)) => (p + packets, if s == "up" { state } else { s }, a),
            });
        }
        total.ok_or_else(|| anyhow::anyhow!("no balancer in the plan"))
    }

    async fn set_state(&self, name: &str, state: &str) -> Result<()> {
        for admin in &self.plan.admins {
            let uri = format!("http://{admin}/backends/{name}/state");
            let (status, body) = client::request(Method::POST, &uri, Some(&self.token), state.into()).await?;
            anyhow::ensure!(status.is_success(), "lbd at {admin} refused {state} for {name}: {status}: {}", body.trim());
        }
        Ok(())
    }

    /// Waits until no packet reached `name` for `quiet`, at most `drain_timeout`.
    async fn wait_drained(&mut self, name: &str) -> Result<()> {
        let start = Instant::now();
        let (mut last, _, _) = self.backend(name).await?;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (now, _, _) = self.backend(name).await?;
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= self.plan.quiet {
                (self.say)(format!("  {name}: drained: no packets for {:?} (after {:.1} s)", self.plan.quiet, start.elapsed().as_secs_f64()));
                return Ok(());
            }
            if start.elapsed() >= self.plan.drain_timeout {
                (self.say)(format!(
                    "  {name}: still has traffic after {:?} (long-lived connections); continuing: the reload keeps open connections",
                    self.plan.drain_timeout
                ));
                return Ok(());
            }
        }
    }

    /// Waits until the node answers /healthz with 200 and reports `version` in /whoami.
    async fn wait_healthy(&self, node: &Node, version: &str) -> Result<()> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < self.plan.health_timeout {
            match client::request(Method::GET, &format!("{}/healthz", node.url), None, String::new()).await {
                Ok((s, _)) if s.is_success() => match client::get_ok(&format!("{}/whoami", node.url)).await {
                    Ok(w) => {
                        let v: serde_json::Value = serde_json::from_str(&w).unwrap_or_default();
                        let served = v["release"].as_str().or(v["version"].as_str()).unwrap_or("?").to_string();
                        if served == version {
                            return Ok(());
                        }
                        last = format!("healthy but serving release {served}");
                    }
                    Err(e) => last = format!("{e:#}"),
                },
                Ok((s, body)) => last = format!("/healthz {s}: {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} not healthy on release {version} within {:?}: {last}", node.backend, self.plan.health_timeout)
    }

    /// Waits until the balancer's own health checks see `name` up again.
    async fn wait_up(&self, name: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            let (_, state, _) = self.backend(name).await?;
            if state == "up" {
                return Ok(());
            }
            if start.elapsed() >= self.plan.health_timeout {
                bail!("lbd still sees {name} {state} after {:?}", self.plan.health_timeout);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drain, switch to `version`, reload, wait healthy, undrain. On failure the node is left
    /// drained on whatever `current` says; the caller rolls back.
    async fn move_node(&mut self, i: usize, version: &str) -> Result<()> {
        let node = &self.plan.nodes[i];
        let n = self.plan.nodes.len();
        let at = match self.plan.admins.len() {
            1 => "the balancer".to_string(),
            k => format!("{k} balancers"),
        };
        (self.say)(format!("[{}/{n}] {}: draining at {at}", i + 1, node.backend));
        self.set_state(&node.backend, "drain").await?;
        self.wait_drained(&node.backend).await?;
        switch_release(&node.releases, version)?;
        (self.say)(format!("  {}: current -> {version}; reloading", node.backend));
        run(&node.reload, None)?;
        self.wait_healthy(node, version).await?;
        (self.say)(format!("  {}: healthy on {version}; back in the balancer", node.backend));
        self.set_state(&node.backend, "ready").await?;
        self.wait_up(&node.backend).await?;
        (self.say)(format!("  {}: up", node.backend));
        Ok(())
    }

    /// Puts node `i` back on `version` and into service, whatever state it is in.
    async fn restore(&mut self, i: usize, version: &str) -> Result<()> {
        let node = &self.plan.nodes[i];
        self.set_state(&node.backend, "drain").await?;
        switch_release(&node.releases, version)?;
        run(&node.reload, None)?;
        self.wait_healthy(node, version).await?;
        self.set_state(&node.backend, "ready").await?;
        self.wait_up(&node.backend).await?;
        (self.say)(format!("  rolled back {} to {version}", node.backend));
        Ok(())
    }
}

/// What a deploy did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every node serves the new release.
    Deployed,
    /// Nothing was changed: the release is missing or does not verify on a node.
    Refused(String),
    /// A node failed on the new release; every node was put back on its previous release.
    RolledBack(String),
}

/// Deploys `version` over the plan's nodes, reporting progress through `say`.
pub async fn deploy(plan: &Plan, version: &str, say: &mut dyn FnMut(String)) -> Result<Outcome> {
    let token = std::fs::read_to_string(&plan.token_file)
        .with_context(|| format!("reading the admin token {} (token_file)", plan.token_file.display()))?;
    let mut d = Deployer { plan, token, say };
    // Preflight: nothing changes unless every node has the release, verified, and the
    // balancer knows every node.
    let mut previous = Vec::new();
    for node in &plan.nodes {
        let dir = node.releases.join(version);
        if !dir.is_dir() {
            return Ok(Outcome::Refused(format!("{}: no release {version} in {}", node.backend, node.releases.display())));
        }
        if let Some(verify) = &plan.verify {
            if let Err(e) = run(verify, Some(&dir)) {
                return Ok(Outcome::Refused(format!("{}: release {version} does not verify: {e:#}", node.backend)));
            }
        }
        d.backend(&node.backend).await?;
        previous.push(current_release(&node.releases)?);
    }
    (d.say)(format!("deploying {version} to {} node(s), one at a time (was: {})", plan.nodes.len(), previous.join(", ")));
    for i in 0..plan.nodes.len() {
        if previous[i] == version {
            (d.say)(format!("[{}/{}] {}: already on {version}", i + 1, plan.nodes.len(), plan.nodes[i].backend));
            continue;
        }
        if let Err(e) = d.move_node(i, version).await {
            let why = format!("{}: {e:#}", plan.nodes[i].backend);
            (d.say)(format!("FAILED {why}; rolling back"));
            for j in (0..=i).rev() {
                d.restore(j, &previous[j]).await.with_context(|| format!("rolling back {} failed too", plan.nodes[j].backend))?;
            }
            return Ok(Outcome::RolledBack(why));
        }
    }
    (d.say)(format!("deployed {version} to every node"));
    Ok(Outcome::Deployed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "admin = \"127.0.0.1:9100\"\ntoken_file = \"/t\"\n\n[[node]]\nbackend = \"web1\"\nreleases = \"/r1\"\nurl = \"http://10.0.0.11:80/\"\nreload = [\"kill\", \"-HUP\", \"1\"]\n";

    #[test]
    fn plan_parses_with_defaults() {
        let p = Plan::parse("plan", GOOD).unwrap();
        assert_eq!(p.admins, ["127.0.0.1:9100".parse().unwrap()]);
        assert_eq!(p.nodes.len(), 1);
        let two = GOOD.replace("admin = \"127.0.0.1:9100\"", "admin = [\"10.0.0.2:9100\", \"10.0.0.3:9100\"]");
        assert_eq!(Plan::parse("plan", &two).unwrap().admins, ["10.0.0.2:9100".parse().unwrap(), "10.0.0.3:9100".parse::<SocketAddr>().unwrap()]);
        assert_eq!(p.nodes[0].url, "http://10.0.0.11:80");
        assert_eq!(p.drain_timeout, Duration::from_secs(10));
        assert!(p.verify.is_none());
    }

    #[test]
    fn plan_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("admin = \"nowhere\"\ntoken_file = \"/t\"\n[[node]]\nbackend=\"a\"\nreleases=\"/r\"\nurl=\"http://x\"\nreload=[\"true\"]\n", 1, "not an address"),
            (&GOOD.replace("reload = [\"kill\", \"-HUP\", \"1\"]", "reload = []"), 8, "reload is empty"),
            (&GOOD.replace("\"127.0.0.1:9100\"", "[\"127.0.0.1:9100\", \"lb2\"]"), 1, "admin \"lb2\" is not an address:port"),
            (&GOOD.replace("\"127.0.0.1:9100\"", "[\"127.0.0.1:9100\", \"127.0.0.1:9100\"]"), 1, "listed twice"),
            (&GOOD.replace("\"127.0.0.1:9100\"", "[]"), 1, "admin is empty"),
            (&GOOD.replace("http://10", "ftp://10"), 7, "expected http"),
            (&GOOD.replace("token_file", "drain_timeout_ms = 0\ntoken_file"), 2, "out of range"),
            (&GOOD.replace("backend", "bakend"), 5, "unknown field"),
            (&format!("{GOOD}\n[[node]]\nbackend = \"web1\"\nreleases = \"/r2\"\nurl = \"http://x\"\nreload = [\"true\"]\n"), 11, "listed twice"),
        ];
        for (text, line, words) in cases {
            let e = Plan::parse("plan", text).expect_err(text);
            assert_eq!(e.line, Some(*line), "{e} for\n{text}");
            assert!(e.message.contains(words), "{e}");
        }
    }

    #[test]
    fn switch_is_a_symlink_swap() {
        let dir = std::env::temp_dir().join(format!("lbd-deploy-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("1.0")).unwrap();
        std::fs::create_dir_all(dir.join("2.0")).unwrap();
        switch_release(&dir, "1.0").unwrap();
        assert_eq!(current_release(&dir).unwrap(), "1.0");
        switch_release(&dir, "2.0").unwrap();
        assert_eq!(current_release(&dir).unwrap(), "2.0");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3, "no temporary link left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
