//! The MariaDB tier against real servers: replication, semi-sync, least privilege, crash and
//! restart. Without MariaDB these skip with a printed reason, or fail when `CI` is set.

use std::time::Duration;

use db_router::tier::{self, Instance, Pair, TierError, APP, MONITOR};

const DEADLINE: Duration = Duration::from_secs(60);

fn pair(test: &str) -> Option<Pair> {
    if !tier::available_or_skip(test) {
        return None;
    }
    Some(Pair::start_default().expect("start a primary/replica pair"))
}

fn slave_field(inst: &Instance, field: &str) -> String {
    inst.slave_status().expect("SHOW SLAVE STATUS").get(field).cloned().unwrap_or_default()
}

#[test]
fn pair_replicates_with_gtid_and_semi_sync_after_sync() {
    let Some(pair) = pair("pair_replicates_with_gtid_and_semi_sync_after_sync") else { return };
    let (p, r) = (&pair.primary, &pair.replica);
    assert_ne!(p.addr(), r.addr());

    assert_eq!(p.value("SELECT @@server_id").unwrap(), "1");
    assert_eq!(r.value("SELECT @@server_id").unwrap(), "2");
    for inst in [p, r] {
        assert_eq!(inst.value("SELECT @@gtid_strict_mode").unwrap(), "1");
        assert_eq!(inst.value("SELECT @@binlog_format").unwrap(), "ROW");
        assert_eq!(inst.value("SELECT @@log_slave_updates").unwrap(), "1");
        assert_eq!(inst.value("SELECT @@rpl_semi_sync_master_wait_point").unwrap(), "AFTER_SYNC");
        assert_eq!(inst.value("SELECT @@rpl_semi_sync_master_wait_no_slave").unwrap(), "0");
    }
    assert_eq!(p.value("SELECT @@read_only").unwrap(), "0");
    assert_eq!(r.value("SELECT @@read_only").unwrap(), "1");
    assert_eq!(p.status("Rpl_semi_sync_master_status").unwrap(), "ON");
    assert_eq!(r.status("Rpl_semi_sync_slave_status").unwrap(), "ON");
    assert_eq!(slave_field(r, "Using_Gtid"), "Slave_Pos");
    assert_eq!(slave_field(r, "Slave_IO_Running"), "Yes");
    assert_eq!(slave_field(r, "Slave_SQL_Running"), "Yes");

    let acked_before: u64 = p.status("Rpl_semi_sync_master_yes_tx").unwrap().parse().unwrap();
    p.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20)); INSERT INTO t VALUES (1, 'hello')")
        .unwrap();
    let acked_after: u64 = p.status("Rpl_semi_sync_master_yes_tx").unwrap().parse().unwrap();
    assert!(acked_after >= acked_before + 2, "commits were acked by the replica: {acked_before} -> {acked_after}");

    pair.wait_caught_up(DEADLINE).unwrap();
    assert_eq!(r.sql_as(&APP, "SELECT v FROM t WHERE id = 1").unwrap().trim(), "hello");
    assert_eq!(
        r.value("SELECT @@gtid_slave_pos").unwrap(),
        p.value("SELECT @@gtid_binlog_pos").unwrap()
    );
}

#[test]
fn least_privilege_accounts() {
    let Some(pair) = pair("least_privilege_accounts") else { return };
    let (p, r) = (&pair.primary, &pair.replica);
    p.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (1)").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();

    // The application account cannot write to the read-only replica.
    let err = r.sql_as(&APP, "INSERT INTO t VALUES (2)").unwrap_err();
    assert!(matches!(&err, TierError::Sql { stderr, .. } if stderr.contains("1290")), "{err}");
    assert_eq!(r.value("SELECT COUNT(*) FROM app.t").unwrap(), "1");
    // ... and has no rights outside its database.
    let err = p.sql_as(&APP, "CREATE TABLE sbtest.x (id INT)").unwrap_err();
    assert!(matches!(&err, TierError::Sql { stderr, .. } if stderr.contains("1142")), "{err}");

    // The monitor sees replication status but no data.
    let status = r.sql_as(&MONITOR, "SHOW SLAVE STATUS").unwrap();
    assert!(status.contains("Yes"), "{status}");
    let err = p.sql_as(&MONITOR, "SELECT * FROM app.t").unwrap_err();
    assert!(matches!(&err, TierError::Sql { stderr, .. } if stderr.contains("1142")), "{err}");
    // It can fence and unfence (READ_ONLY ADMIN) ...
    p.sql_as(&MONITOR, "SET GLOBAL read_only=ON").unwrap();
    assert!(p.sql_as(&APP, "INSERT INTO t VALUES (3)").is_err());
    p.sql_as(&MONITOR, "SET GLOBAL read_only=OFF").unwrap();
    p.sql_as(&APP, "INSERT INTO t VALUES (3)").unwrap();
    // ... and hold replication (REPLICATION SLAVE ADMIN).
    r.sql_as(&MONITOR, "STOP SLAVE; START SLAVE").unwrap();

    let grants = p.sql("SHOW GRANTS FOR 'app'@'%'").unwrap();
    assert!(!grants.contains("SUPER") && !grants.contains("READ_ONLY ADMIN"), "{grants}");
    let grants = p.sql("SHOW GRANTS FOR 'repl'@'%'").unwrap();
    assert!(grants.contains("GRANT REPLICATION SLAVE ON *.*"), "{grants}");
}

#[test]
fn held_back_replica_catches_up_after_sql_thread_restarts() {
    let Some(pair) = pair("held_back_replica_catches_up_after_sql_thread_restarts") else { return };
    let (p, r) = (&pair.primary, &pair.replica);
    p.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY)").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();

    pair.stop_replica_sql().unwrap();
    p.sql_as(&APP, "INSERT INTO t VALUES (1), (2)").unwrap();
    // The write was acked (received) but not applied: the SQL thread is stopped.
    assert_eq!(slave_field(r, "Slave_SQL_Running"), "No");
    assert_eq!(r.value("SELECT COUNT(*) FROM app.t").unwrap(), "0");
    assert!(pair.wait_caught_up(Duration::from_millis(300)).is_err());

    pair.start_replica_sql().unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();
    assert_eq!(r.value("SELECT COUNT(*) FROM app.t").unwrap(), "2");
}

#[test]
fn kill9_and_restart_keep_data_and_replication() {
    let Some(mut pair) = pair("kill9_and_restart_keep_data_and_replication") else { return };
    pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (1)").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();

    let pid = pair.primary.pid().expect("running primary has a pid");
    pair.primary.kill9().unwrap();
    assert!(!pair.primary.is_running());
    // SAFETY: signal 0 only checks whether the pid exists.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "mariadbd {pid} is gone");
    assert!(pair.primary.sql("SELECT 1").is_err());
    // The replica notices it lost its primary.
    tier::poll("the replica's IO thread to lose the primary", DEADLINE, || {
        (slave_field(&pair.replica, "Slave_IO_Running") != "Yes").then_some(())
    });

    pair.primary.start().unwrap();
    assert_eq!(pair.primary.value("SELECT COUNT(*) FROM app.t").unwrap(), "1");
    pair.primary.sql_as(&APP, "INSERT INTO t VALUES (2)").unwrap();
    // MASTER_CONNECT_RETRY=1: the replica reconnects by itself.
    pair.wait_caught_up(DEADLINE).unwrap();
    assert_eq!(pair.replica.value("SELECT COUNT(*) FROM app.t").unwrap(), "2");

    // A clean stop and start work too.
    pair.replica.stop().unwrap();
    assert!(!pair.replica.is_running());
    pair.replica.start().unwrap();
    assert_eq!(pair.replica.value("SELECT COUNT(*) FROM app.t").unwrap(), "2");
}

#[test]
fn drop_kills_the_server_and_removes_its_directory() {
    if !tier::available_or_skip("drop_kills_the_server_and_removes_its_directory") {
        return;
    }
    let inst = Instance::new(Default::default()).unwrap();
    let (dir, pid) = (inst.dir().to_path_buf(), inst.pid().unwrap());
    assert!(dir.join("data").is_dir());
    assert_eq!(inst.value("SELECT 40 + 2").unwrap(), "42");
    drop(inst);
    assert!(!dir.exists(), "{} removed", dir.display());
    // SAFETY: signal 0 only checks whether the pid exists.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "mariadbd {pid} is gone");
}

#[test]
fn too_long_a_socket_path_is_a_clear_error() {
    if !tier::available_or_skip("too_long_a_socket_path_is_a_clear_error") {
        return;
    }
    let parent = std::env::temp_dir().join("x".repeat(100));
    let err = Instance::new(tier::InstanceConfig { parent_dir: Some(parent.clone()), ..Default::default() }).unwrap_err();
    assert!(matches!(&err, TierError::Config(m) if m.contains("at most 107")), "{err}");
    assert!(!parent.exists(), "nothing created");
}

#[test]
fn bad_statement_is_a_clear_error() {
    if !tier::available_or_skip("bad_statement_is_a_clear_error") {
        return;
    }
    let inst = Instance::new(Default::default()).unwrap();
    let err = inst.sql("SELEC 1").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("SELEC 1") && text.contains("1064"), "{text}");
}
