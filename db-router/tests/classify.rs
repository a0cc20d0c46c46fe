//! The classifier, table-driven: one statement and its expected class per line.

use db_router::classify::{classify, multi_changes_session, use_database, Class, Class::*};

const CASES: &[(&str, Class)] = &[
    // Plain reads: replica.
    ("SELECT 1", Read),
    ("select * from t where id = 5", Read),
    ("  \n\t SeLeCt a, b FROM t ORDER BY a LIMIT 10", Read),
    ("SELECT c FROM sbtest1 WHERE id=42", Read),
    ("SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN 1 AND 100 ORDER BY c", Read),
    ("SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN 1 AND 100", Read),
    ("(SELECT 1) UNION (SELECT 2)", Read),
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", Read),
    ("VALUES (1), (2)", Read),
    ("SELECT 1;", Read),
    ("SELECT 1 ;  ", Read),
    ("SELECT 1; -- trailing comment", Read),
    ("SELECT @@version", Read),
    ("SELECT @@session.time_zone, @@global.read_only", Read),
    ("SELECT NOW(), DATABASE(), USER()", Read),
    ("SELECT REPLACE(name, 'a', 'b') FROM t", Read),
    ("SELECT INSERT('abc', 1, 1, 'x')", Read),
    ("SELECT update_time, deleted FROM t", Read),
    ("SELECT 'INSERT INTO t VALUES (1)' AS s", Read),
    ("SELECT `for`, `update` FROM t", Read),
    ("SELECT \"DELETE FROM t\"", Read),
    ("SELECT 'it''s; fine'", Read),
    ("SELECT 'back\\'slash; still a string'", Read),
    // Comments and hints.
    ("/* leading comment */ SELECT 1", Read),
    ("-- line comment\nSELECT 1", Read),
    ("# hash comment\nSELECT 1", Read),
    ("SELECT /*+ MAX_EXECUTION_TIME(100) */ * FROM t", Read),
    ("SELECT /*!40001 SQL_NO_CACHE */ * FROM t", Read),
    ("/* INSERT INTO t VALUES (1) */ SELECT 1", Read),
    ("SELECT 1 -- FOR UPDATE", Read),
    ("SELECT 1 # FOR UPDATE", Read),
    ("/*!40101 SELECT 1 */", Read),
    ("/*M!100100 SELECT 1 */", Read),
    ("/*!50000 INSERT INTO t VALUES (1) */", Write),
    ("SELECT 1 /*! FOR UPDATE */", Write),
    ("/*!40101 SET NAMES utf8mb4 */", SessionSet),
    ("SELECT 1 --not-a-comment", Read),
    // Locking reads and primary-only functions: primary.
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", Write),
    ("select * from t where id = 1 for update nowait", Write),
    ("SELECT * FROM t WHERE id = 1 FOR SHARE", Write),
    ("SELECT * FROM t LOCK IN SHARE MODE", Write),
    ("SELECT * FROM t\n  lock\tin share mode", Write),
    ("SELECT LAST_INSERT_ID()", Write),
    ("select last_insert_id ( )", Write),
    ("SELECT GET_LOCK('a', 10)", Write),
    ("SELECT RELEASE_LOCK('a')", Write),
    ("SELECT IS_FREE_LOCK('a')", Write),
    ("SELECT @@identity", Write),
    ("SELECT @@last_insert_id", Write),
    ("SELECT @@session.last_gtid", Write),
    ("SELECT NEXTVAL(s)", Write),
    ("SELECT NEXT VALUE FOR s", Write),
    ("SELECT 1 INTO @x", Write),
    ("SELECT c INTO OUTFILE '/tmp/x' FROM t", Write),
    ("SELECT @x", Write),
    ("SELECT @x := 1", Write),
    ("WITH d AS (SELECT id FROM t) DELETE FROM t WHERE id IN (SELECT id FROM d)", Write),
    // About the previous statement: where it ran.
    ("SELECT FOUND_ROWS()", Previous),
    ("SELECT ROW_COUNT()", Previous),
    ("SHOW WARNINGS", Previous),
    ("SHOW ERRORS LIMIT 5", Previous),
    ("SHOW COUNT(*) WARNINGS", Previous),
    // SHOW and friends: replica, except the primary's binlog state.
    ("SHOW TABLES", Read),
    ("show full processlist", Read),
    ("SHOW VARIABLES LIKE 'max_connections'", Read),
    ("SHOW CREATE TABLE t", Read),
    ("SHOW SLAVE STATUS", Read),
    ("SHOW MASTER STATUS", Write),
    ("SHOW BINARY LOGS", Write),
    ("SHOW BINLOG EVENTS", Write),
    ("DESCRIBE t", Read),
    ("DESC t", Read),
    ("EXPLAIN SELECT * FROM t", Read),
    ("HELP 'select'", Read),
    // Writes and DDL.
    ("INSERT INTO t VALUES (1)", Write),
    ("insert into t select * from u", Write),
    ("REPLACE INTO t VALUES (1)", Write),
    ("UPDATE t SET a = 1", Write),
    ("DELETE FROM t", Write),
    ("LOAD DATA LOCAL INFILE '/tmp/x' INTO TABLE t", Write),
    ("CREATE TABLE t (a INT)", Write),
    ("ALTER TABLE t ADD b INT", Write),
    ("DROP TABLE t", Write),
    ("DROP TEMPORARY TABLE tmp", Write),
    ("TRUNCATE t", Write),
    ("RENAME TABLE a TO b", Write),
    ("GRANT SELECT ON db.* TO u", Write),
    ("CALL p(1)", Write),
    ("DO GET_LOCK('a', 1)", Write),
    ("XA START 'x'", Write),
    ("HANDLER t OPEN", Write),
    ("PREPARE s FROM 'SELECT 1'", Write),
    ("EXECUTE s", Write),
    ("DEALLOCATE PREPARE s", Write),
    ("FLUSH TABLES", Write),
    ("KILL 5", Write),
    ("ANALYZE TABLE t", Write),
    ("OPTIMIZE TABLE t", Write),
    ("BEGIN NOT ATOMIC SELECT 1; END", Write),
    ("", Write),
    ("   ", Write),
    ("/* only a comment */", Write),
    ("FROBNICATE everything", Write),
    // Multi-statements: primary.
    ("SELECT 1; SELECT 2", Write),
    ("SELECT 1;SELECT 2;", Write),
    ("SET @a = 1; SELECT @a", Write),
    ("SELECT ';' ; SELECT 1", Write),
    // Session commands.
    ("SET NAMES utf8mb4", SessionSet),
    ("SET @a = 1", SessionSet),
    ("set session sql_mode = 'STRICT_ALL_TABLES'", SessionSet),
    ("SET @@session.time_zone = '+00:00'", SessionSet),
    ("SET time_zone = '+00:00', @b = 2", SessionSet),
    ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", SessionSet),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", SessionOnce),
    ("SET TRANSACTION READ ONLY", SessionOnce),
    ("SET autocommit = 0", SetAutocommit(false)),
    ("SET autocommit=1", SetAutocommit(true)),
    ("set AUTOCOMMIT = off", SetAutocommit(false)),
    ("SET @@autocommit = ON", SetAutocommit(true)),
    ("SET SESSION autocommit = 0", SetAutocommit(false)),
    ("SET @@session.autocommit := 0", SetAutocommit(false)),
    ("SET sql_mode = '', autocommit = 0", SetAutocommit(false)),
    ("SET autocommit = @saved", Write),
    ("SET GLOBAL max_connections = 10", Write),
    ("SET @@global.read_only = 1", Write),
    ("SET PASSWORD = PASSWORD('x')", Write),
    ("SET STATEMENT max_statement_time = 1 FOR SELECT * FROM t", Read),
    ("SET STATEMENT max_statement_time = 1 FOR UPDATE t SET a = 1", Write),
    ("SET STATEMENT sql_mode = (SELECT 'a') FOR SELECT 1", Read),
    ("USE app", Use),
    ("use `my db`", Use),
    // Transactions.
    ("BEGIN", Begin { read_only: false }),
    ("begin work", Begin { read_only: false }),
    ("START TRANSACTION", Begin { read_only: false }),
    ("START TRANSACTION READ WRITE", Begin { read_only: false }),
    ("START TRANSACTION WITH CONSISTENT SNAPSHOT", Begin { read_only: false }),
    ("START TRANSACTION READ ONLY", Begin { read_only: true }),
    ("start transaction read only, with consistent snapshot", Begin { read_only: true }),
    ("COMMIT", TxnControl),
    ("commit work", TxnControl),
    ("ROLLBACK", TxnControl),
    ("ROLLBACK TO SAVEPOINT a", TxnControl),
    ("SAVEPOINT a", TxnControl),
    ("RELEASE SAVEPOINT a", TxnControl),
    ("START SLAVE", Write),
    // Temporary tables and table locks pin the session.
    ("CREATE TEMPORARY TABLE tmp (a INT)", TempTable),
    ("create or replace temporary table tmp select 1", TempTable),
    ("LOCK TABLES t READ", LockTables),
    ("lock table t write", LockTables),
    ("UNLOCK TABLES", UnlockTables),
];

#[test]
fn statements_classify_as_expected() {
    assert!(CASES.len() >= 80, "at least 80 statements, have {}", CASES.len());
    let mut failures = Vec::new();
    for (sql, want) in CASES {
        let got = classify(sql.as_bytes());
        if got != *want {
            failures.push(format!("{sql:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} misclassified:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

#[test]
fn session_commands_are_marked() {
    for (sql, class) in CASES {
        let session = matches!(class, SessionSet | SetAutocommit(_) | SessionOnce | Use);
        assert_eq!(class.is_session_command(), session, "{sql}");
    }
}

#[test]
fn use_names_the_database() {
    assert_eq!(use_database(b"USE app").as_deref(), Some("app"));
    assert_eq!(use_database(b"use `my db`").as_deref(), Some("my db"));
}

#[test]
fn binary_and_truncated_input_does_not_panic() {
    for sql in [&b"\xff\xfe\x00SELECT"[..], b"SELECT '", b"/*", b"/*!", b"SELECT `a", b"@", b"@@", b"--", b"SET STATEMENT", b"SET autocommit ="] {
        let _ = classify(sql);
    }
    assert_eq!(classify(b"SELECT 'unterminated"), Read);
    assert_eq!(classify(b"\xc3\xa9 SELECT"), Write);
}

#[test]
fn multi_statements_that_change_the_session_are_found() {
    for sql in ["SET @a = 1; SELECT @a", "SELECT 1; USE app", "INSERT INTO t VALUES (1); CREATE TEMPORARY TABLE x (a INT)", "select 1;\n begin; update t set a = 1; commit", "SELECT 1; LOCK TABLES t READ"] {
        assert!(multi_changes_session(sql.as_bytes()), "{sql}");
    }
    for sql in ["SELECT 1; SELECT 2", "INSERT INTO t VALUES (1); UPDATE t SET a = 2", "SELECT 'SET x'; SELECT 2", "SELECT 1 /* ; SET @a = 1 */"] {
        assert!(!multi_changes_session(sql.as_bytes()), "{sql}");
    }
}
