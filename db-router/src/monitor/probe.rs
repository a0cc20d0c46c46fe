//! The monitor's I/O: one mysql_async connection per backend (as the monitor account), the
//! status poll, and the fence / promote / rejoin statements. Every call is bounded by a
//! timeout; any error drops the connection and the next call reconnects.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};

use super::decide::{Check, Replication};

type ConnFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, mysql_async::Error>> + Send + 'c>>;

pub struct Prober {
    pub addr: SocketAddr,
    opts: OptsBuilder,
    conn: Option<Conn>,
    connect_timeout: Duration,
    query_timeout: Duration,
}

/// How long a rejoin waits for both replication threads to run.
const REJOIN_CONFIRM: Duration = Duration::from_secs(10);

/// SQL string literal (single quotes, backslash and quote escaped).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn text(row: &Row, col: &str) -> String {
    row.get_opt::<Option<String>, _>(col).and_then(|r| r.ok()).flatten().unwrap_or_default()
}

impl Prober {
    /// With `tls`, the checks run over TLS and the server's certificate is checked as the
    /// router's own connections check it (`crate::tls::BackendTls`).
    pub fn new(addr: SocketAddr, user: &str, password: &str, connect_timeout: Duration, query_timeout: Duration, tls: Option<&crate::tls::BackendTls>) -> Self {
        let ssl = tls.map(|t| {
            let opts = mysql_async::SslOpts::default().with_root_certs(vec![t.ca.clone().into()]).with_disable_built_in_roots(true);
            match &t.server_name {
                Some(name) => opts.with_danger_tls_hostname_override(Some(name.clone())),
                None => opts,
            }
        });
        let opts = OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(user))
            .pass(Some(password))
            .prefer_socket(false)
            .stmt_cache_size(0)
            .ssl_opts(ssl);
        Prober { addr, opts, conn: None, connect_timeout, query_timeout }
    }

    async fn conn(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            let conn = tokio::time::timeout(self.connect_timeout, Conn::new(self.opts.clone()))
                .await
                .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))?
                .map_err(|e| format!("connect: {e}"))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Runs `f` on the connection within `limit`; on error the connection is dropped.
    async fn with_conn<T>(
        &mut self,
        limit: Duration,
        f: impl for<'c> FnOnce(&'c mut Conn) -> ConnFuture<'c, T>,
    ) -> Result<T, String> {
        let conn = self.conn().await?;
        let result = match tokio::time::timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("query timed out after {limit:?}")),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn rows(&mut self, q: &str) -> Result<Vec<Row>, String> {
        let q = q.to_string();
        self.with_conn(self.query_timeout, move |c| Box::pin(async move { c.query::<Row, _>(q).await })).await
    }

    async fn exec(&mut self, q: &str, limit: Duration) -> Result<(), String> {
        let shown = redact(&q_for_log(q));
        let q = q.to_string();
        self.with_conn(limit, move |c| Box::pin(async move { c.query_drop(q).await }))
            .await
            .map_err(|e| format!("{e} (in: {shown})"))
    }

    /// One status poll; unreachable (with the reason) on any failure.
    pub async fn check(&mut self) -> Check {
        match self.try_check().await {
            Ok(c) => c,
            Err(e) => Check { reachable: false, error: Some(e), ..Default::default() },
        }
    }

    async fn try_check(&mut self) -> Result<Check, String> {
        let vars = self
            .rows(
                "SELECT @@global.read_only AS ro, @@global.gtid_binlog_pos AS binlog, \
                 @@global.gtid_current_pos AS cur, @@global.gtid_slave_pos AS slave",
            )
            .await?;
        let v = vars.first().ok_or("no row for the status variables")?;
        let replication = self.rows("SHOW SLAVE STATUS").await?.first().map(|r| Replication {
            source: format!("{}:{}", text(r, "Master_Host"), text(r, "Master_Port")),
            io_running: text(r, "Slave_IO_Running"),
            sql_running: text(r, "Slave_SQL_Running") == "Yes",
            seconds_behind_master: text(r, "Seconds_Behind_Master").parse().ok(),
            gtid_io_pos: text(r, "Gtid_IO_Pos"),
            last_io_error: text(r, "Last_IO_Error"),
            last_sql_error: text(r, "Last_SQL_Error"),
        });
        Ok(Check {
            reachable: true,
            error: None,
            read_only: text(v, "ro") == "1",
            gtid_binlog_pos: text(v, "binlog"),
            gtid_current_pos: text(v, "cur"),
            gtid_slave_pos: text(v, "slave"),
            replication,
        })
    }

    /// `SET GLOBAL read_only=ON`.
    pub async fn fence(&mut self) -> Result<(), String> {
        self.exec("SET GLOBAL read_only=ON", self.query_timeout).await
    }

    /// Promotes this replica: stop receiving, apply everything received (bounded by
    /// `apply_timeout`), stop replicating, forget the old primary, become writable.
    /// Returns the GTID position it applied up to.
    pub async fn promote(&mut self, apply_timeout: Duration) -> Result<String, String> {
        self.exec("STOP SLAVE IO_THREAD", self.query_timeout).await?;
        let result = self.apply_and_promote(apply_timeout).await;
        if result.is_err() {
            // Not promoted: let it follow the old primary again should that come back.
            let _ = self.exec("START SLAVE", self.query_timeout).await;
        }
        result
    }

    async fn apply_and_promote(&mut self, apply_timeout: Duration) -> Result<String, String> {
        let status = self.rows("SHOW SLAVE STATUS").await?;
        let io_pos = status.first().map(|r| text(r, "Gtid_IO_Pos")).unwrap_or_default();
        tracing::info!(backend = %self.addr, received = %io_pos, "promotion: receiving stopped; applying what was received");
        self.exec("START SLAVE SQL_THREAD", self.query_timeout).await?;
        if !io_pos.is_empty() {
            let q = format!("SELECT MASTER_GTID_WAIT({}, {}) AS w", quote(&io_pos), apply_timeout.as_secs_f64());
            let limit = apply_timeout + self.query_timeout;
            let rows = self.with_conn(limit, move |c| Box::pin(async move { c.query::<Row, _>(q).await })).await?;
            let waited = rows.first().map(|r| text(r, "w")).unwrap_or_default();
            if waited != "0" {
                return Err(format!("did not apply the received {io_pos} within {apply_timeout:?}"));
            }
        }
        tracing::info!(backend = %self.addr, "promotion: applied; STOP SLAVE, RESET SLAVE ALL, read_only=OFF");
        for q in ["STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only=OFF"] {
            self.exec(q, self.query_timeout).await?;
        }
        Ok(io_pos)
    }

    /// Makes this backend a read-only replica of `primary` from its own binlog position.
    pub async fn rejoin(&mut self, primary: SocketAddr, repl_user: &str, repl_password: &str) -> Result<(), String> {
        self.exec("SET GLOBAL read_only=ON", self.query_timeout).await?;
        self.exec("STOP SLAVE", self.query_timeout).await?;
        let rows = self.rows("SELECT @@global.gtid_binlog_pos AS p").await?;
        let pos = rows.first().map(|r| text(r, "p")).unwrap_or_default();
        if !pos.is_empty() {
            self.exec(&format!("SET GLOBAL gtid_slave_pos={}", quote(&pos)), self.query_timeout).await?;
        }
        let change = format!(
            "CHANGE MASTER TO MASTER_HOST={}, MASTER_PORT={}, MASTER_USER={}, MASTER_PASSWORD={}, \
             MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            quote(&primary.ip().to_string()),
            primary.port(),
            quote(repl_user),
            quote(repl_password)
        );
        tracing::info!(backend = %self.addr, %primary, gtid_slave_pos = %pos, "rejoin: read_only=ON, CHANGE MASTER TO the primary, START SLAVE");
        self.exec(&change, self.query_timeout).await?;
        self.exec("START SLAVE", self.query_timeout).await?;
        self.wait_replicating(REJOIN_CONFIRM).await
    }

    /// Waits (bounded) until both replication threads run, seen on two polls in a row (50 ms
    /// apart); a thread that stops (e.g. the primary lacks this backend's GTID position:
    /// an errant transaction) is an error. Why two: the IO thread shows `Yes` from its
    /// connection on, before the primary has answered its request for the binlog (with
    /// error 1236 when the position is errant).
    async fn wait_replicating(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut running_before = false;
        loop {
            let rows = self.rows("SHOW SLAVE STATUS").await?;
            let r = rows.first().ok_or("no replication configured after CHANGE MASTER")?;
            let (io, sql) = (text(r, "Slave_IO_Running"), text(r, "Slave_SQL_Running"));
            let running = io == "Yes" && sql == "Yes";
            if running && running_before {
                return Ok(());
            }
            running_before = running;
            if io == "No" || sql == "No" {
                return Err(format!(
                    "replication stopped: IO {io}, SQL {sql}; {} {}",
                    text(r, "Last_IO_Error"),
                    text(r, "Last_SQL_Error")
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("not connected to the primary after {limit:?}: {}", text(r, "Last_IO_Error")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn q_for_log(q: &str) -> String {
    q.chars().take(120).collect()
}

/// Hides a password in a statement quoted in an error message.
fn redact(q: &str) -> String {
    match q.find("MASTER_PASSWORD=") {
        Some(i) => format!("{}MASTER_PASSWORD=<hidden> ...", &q[..i]),
        None => q.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote("0-1-5"), "'0-1-5'");
    }

    #[test]
    fn redact_hides_passwords() {
        let q = "CHANGE MASTER TO MASTER_USER='repl', MASTER_PASSWORD='secret', MASTER_USE_GTID=slave_pos";
        assert!(!redact(q).contains("secret"));
        assert_eq!(redact("STOP SLAVE"), "STOP SLAVE");
    }
}
