//! Statement classifier: where a COM_QUERY (or a prepared statement's text) may run.
//!
//! A hand tokenizer plus keyword rules, not a SQL parser: a parse costs microseconds per
//! statement and the parsers we measured reject MariaDB syntax the router must pass through
//! (`LOCK IN SHARE MODE`, `DO`, `XA`, `PREPARE ... FROM`, `SET STATEMENT ... FOR`). Anything the
//! rules do not recognise goes to the primary, which is always correct.
//!
//! The tokenizer skips comments (`/* */`, `-- `, `#`) and optimizer hints (`/*+ */`), but reads
//! the inside of executable comments (`/*! ... */`, `/*!40101 ... */`, `/*M! ... */`), because the
//! server runs what they contain. Strings, backquoted names and numbers are opaque tokens, so a
//! keyword inside a string or a name never changes the class.

/// Where a statement may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// An autocommit read: the replica may serve it.
    Read,
    /// Primary only: writes, DDL, locking reads, primary-only functions, multi-statements,
    /// anything unknown.
    Write,
    /// Session state (`SET ...`): runs on every backend connection of the session and is
    /// replayed on connections opened later.
    SessionSet,
    /// `SET autocommit = 0|1`: a session command that also switches transaction routing.
    SetAutocommit(bool),
    /// `SET TRANSACTION ...`: every backend connection, but only for the next transaction, so
    /// it is not replayed.
    SessionOnce,
    /// `USE db`: every backend connection; the database is remembered for new connections.
    Use,
    /// `BEGIN` / `START TRANSACTION`; a `READ ONLY` transaction may run on the replica.
    Begin { read_only: bool },
    /// `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE SAVEPOINT`: where the transaction runs.
    TxnControl,
    /// `CREATE TEMPORARY TABLE`: primary, and the session stays on the primary afterwards.
    TempTable,
    /// `LOCK TABLES`: primary, and the session stays there until `UNLOCK TABLES`.
    LockTables,
    /// `UNLOCK TABLES`: primary; ends the `LOCK TABLES` pin.
    UnlockTables,
    /// Reads about the previous statement (`FOUND_ROWS()`, `ROW_COUNT()`, `SHOW WARNINGS`):
    /// where the previous statement ran.
    Previous,
}

impl Class {
    /// True for the statements that run on every backend connection of the session.
    pub fn is_session_command(self) -> bool {
        matches!(self, Class::SessionSet | Class::SetAutocommit(_) | Class::SessionOnce | Class::Use)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Keyword or unquoted name.
    Word,
    /// `name` in backquotes.
    Quoted,
    /// '...' or "..." literal.
    Str,
    /// `@name` (user variable).
    UserVar,
    /// `@@name`, `@@session.name`.
    SysVar,
    /// `:=`
    Assign,
    /// `;`
    Semi,
    /// Any other punctuation byte.
    Punct(u8),
}

#[derive(Clone, Copy, Debug)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Splits `sql` into tokens, dropping comments and whitespace.
fn tokenize(sql: &[u8]) -> Vec<Tok> {
    let mut toks = Vec::with_capacity(16);
    let n = sql.len();
    let mut i = 0;
    let mut in_exec_comment = false;
    while i < n {
        let b = sql[i];
        if b.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let next = if i + 1 < n { sql[i + 1] } else { 0 };
        if b == b'/' && next == b'*' {
            // `/*!` and `/*M!`: the server executes the body; skip the marker and version.
            let exec = if sql.get(i + 2) == Some(&b'!') {
                Some(i + 3)
            } else if sql.get(i + 2) == Some(&b'M') && sql.get(i + 3) == Some(&b'!') {
                Some(i + 4)
            } else {
                None
            };
            if let Some(mut j) = exec {
                while j < n && sql[j].is_ascii_digit() {
                    j += 1;
                }
                in_exec_comment = true;
                i = j;
                continue;
            }
            // A plain comment or an optimizer hint: skip to `*/` (or to the end).
            match find(&sql[i + 2..], b"*/") {
                Some(p) => i = i + 2 + p + 2,
                None => i = n,
            }
            continue;
        }
        if b == b'*' && next == b'/' && in_exec_comment {
            in_exec_comment = false;
            i += 2;
            continue;
        }
        if b == b'#' || (b == b'-' && next == b'-' && (i + 2 >= n || sql[i + 2].is_ascii_whitespace() || sql[i + 2].is_ascii_control())) {
            while i < n && sql[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        let start = i;
        let kind = match b {
            b'\'' | b'"' => {
                i = skip_quoted(sql, i, b, true);
                Kind::Str
            }
            b'`' => {
                i = skip_quoted(sql, i, b'`', false);
                Kind::Quoted
            }
            b'@' if next == b'@' => {
                i += 2;
                while i < n && (is_ident(sql[i]) || sql[i] == b'.') {
                    i += 1;
                }
                Kind::SysVar
            }
            b'@' => {
                i += 1;
                if i < n && matches!(sql[i], b'\'' | b'"' | b'`') {
                    i = skip_quoted(sql, i, sql[i], sql[i] != b'`');
                } else {
                    while i < n && (is_ident(sql[i]) || sql[i] == b'.') {
                        i += 1;
                    }
                }
                Kind::UserVar
            }
            b':' if next == b'=' => {
                i += 2;
                Kind::Assign
            }
            b';' => {
                i += 1;
                Kind::Semi
            }
            _ if is_ident(b) => {
                while i < n && is_ident(sql[i]) {
                    i += 1;
                }
                Kind::Word
            }
            _ => {
                i += 1;
                Kind::Punct(b)
            }
        };
        toks.push(Tok { kind, start, end: i });
    }
    toks
}

/// Index just past the closing quote of the literal opening at `at`.
fn skip_quoted(sql: &[u8], at: usize, quote: u8, backslash: bool) -> usize {
    let mut i = at + 1;
    while i < sql.len() {
        let b = sql[i];
        if backslash && b == b'\\' {
            i += 2;
            continue;
        }
        if b == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    sql.len()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Stmt<'a> {
    sql: &'a [u8],
    toks: Vec<Tok>,
}

impl Stmt<'_> {
    fn text(&self, i: usize) -> &[u8] {
        self.toks.get(i).map(|t| &self.sql[t.start..t.end]).unwrap_or(b"")
    }
    /// Token `i` is the keyword `kw` (case-insensitive, unquoted).
    fn is(&self, i: usize, kw: &str) -> bool {
        matches!(self.toks.get(i), Some(t) if t.kind == Kind::Word && self.sql[t.start..t.end].eq_ignore_ascii_case(kw.as_bytes()))
    }
    fn is_any(&self, i: usize, kws: &[&str]) -> bool {
        kws.iter().any(|k| self.is(i, k))
    }
    fn punct(&self, i: usize, p: u8) -> bool {
        matches!(self.toks.get(i), Some(t) if t.kind == Kind::Punct(p))
    }
}

/// Functions whose result depends on the connection or which take locks or change data:
/// a call sends the statement to the primary.
const PRIMARY_FUNCTIONS: &[&str] = &[
    "LAST_INSERT_ID",
    "GET_LOCK",
    "RELEASE_LOCK",
    "RELEASE_ALL_LOCKS",
    "IS_FREE_LOCK",
    "IS_USED_LOCK",
    "NEXTVAL",
    "LASTVAL",
    "SETVAL",
    "MASTER_POS_WAIT",
];

/// Functions about the previous statement of this connection.
const PREVIOUS_FUNCTIONS: &[&str] = &["FOUND_ROWS", "ROW_COUNT"];

/// System variables that only the primary connection knows.
const PRIMARY_SYSVARS: &[&str] = &["identity", "last_insert_id", "last_gtid", "insert_id"];

/// Keywords that make a read-looking statement a write (CTEs in front of DML).
const DML: &[&str] = &["INSERT", "UPDATE", "DELETE", "REPLACE"];

/// Classifies one COM_QUERY payload.
pub fn classify(sql: &[u8]) -> Class {
    let mut toks = tokenize(sql);
    // Trailing semicolons end one statement; anything after a semicolon is a second one.
    while matches!(toks.last(), Some(t) if t.kind == Kind::Semi) {
        toks.pop();
    }
    if toks.iter().any(|t| t.kind == Kind::Semi) {
        return Class::Write;
    }
    classify_tokens(&Stmt { sql, toks })
}

fn classify_tokens(s: &Stmt<'_>) -> Class {
    if s.toks.is_empty() {
        return Class::Write;
    }
    if s.punct(0, b'(') || s.is_any(0, &["SELECT", "WITH", "VALUES", "TABLE"]) {
        return read_rules(s);
    }
    if s.is(0, "SHOW") {
        return if s.is_any(1, &["MASTER", "BINLOG", "BINARY"]) {
            Class::Write
        } else if s.is_any(1, &["WARNINGS", "ERRORS", "PROFILE", "PROFILES"]) || (s.is(1, "COUNT") && s.toks.len() > 2) {
            Class::Previous
        } else {
            Class::Read
        };
    }
    if s.is_any(0, &["DESCRIBE", "DESC", "EXPLAIN", "HELP"]) {
        return Class::Read;
    }
    if s.is(0, "SET") {
        return set_rules(s);
    }
    if s.is(0, "USE") {
        return Class::Use;
    }
    if s.is(0, "BEGIN") {
        // `BEGIN NOT ATOMIC ... END` is a compound statement, not a transaction.
        return if s.toks.len() == 1 || (s.is(1, "WORK") && s.toks.len() == 2) { Class::Begin { read_only: false } } else { Class::Write };
    }
    if s.is(0, "START") && s.is(1, "TRANSACTION") {
        let read_only = (2..s.toks.len()).any(|i| s.is(i, "READ") && s.is(i + 1, "ONLY"));
        return Class::Begin { read_only };
    }
    if s.is_any(0, &["COMMIT", "ROLLBACK", "SAVEPOINT"]) || (s.is(0, "RELEASE") && s.is(1, "SAVEPOINT")) {
        return Class::TxnControl;
    }
    if s.is(0, "CREATE") {
        let mut i = 1;
        if s.is(i, "OR") && s.is(i + 1, "REPLACE") {
            i += 2;
        }
        if s.is(i, "TEMPORARY") {
            return Class::TempTable;
        }
        return Class::Write;
    }
    if s.is(0, "LOCK") && s.is_any(1, &["TABLE", "TABLES"]) {
        return Class::LockTables;
    }
    if s.is(0, "UNLOCK") && s.is_any(1, &["TABLE", "TABLES"]) {
        return Class::UnlockTables;
    }
    Class::Write
}

fn read_rules(s: &Stmt<'_>) -> Class {
    let mut class = Class::Read;
    for (i, t) in s.toks.iter().enumerate() {
        match t.kind {
            Kind::Word => {
                if (s.is(i, "FOR") && s.is_any(i + 1, &["UPDATE", "SHARE"]))
                    || (s.is(i, "LOCK") && s.is(i + 1, "IN"))
                    || s.is(i, "INTO")
                    || (s.is_any(i, DML) && !s.punct(i + 1, b'('))
                    || (s.is_any(i, &["NEXT", "PREVIOUS"]) && s.is(i + 1, "VALUE") && s.is(i + 2, "FOR"))
                {
                    return Class::Write;
                }
                if s.punct(i + 1, b'(') {
                    if s.is_any(i, PRIMARY_FUNCTIONS) {
                        return Class::Write;
                    }
                    if s.is_any(i, PREVIOUS_FUNCTIONS) {
                        class = Class::Previous;
                    }
                }
            }
            Kind::SysVar => {
                let name = &s.text(i)[2..];
                let name = strip_scope(name);
                if PRIMARY_SYSVARS.iter().any(|v| name.eq_ignore_ascii_case(v.as_bytes())) {
                    return Class::Write;
                }
            }
            // User variables may hold values only the primary has (`SET @id = LAST_INSERT_ID()`,
            // `SELECT ... INTO @x`), so reads of them go there.
            Kind::UserVar | Kind::Assign => return Class::Write,
            _ => {}
        }
    }
    class
}

fn strip_scope(name: &[u8]) -> &[u8] {
    for scope in [&b"session."[..], b"local.", b"global."] {
        if name.len() > scope.len() && name[..scope.len()].eq_ignore_ascii_case(scope) {
            return &name[scope.len()..];
        }
    }
    name
}

fn set_rules(s: &Stmt<'_>) -> Class {
    // `SET STATEMENT var=value [, ...] FOR <statement>`: the inner statement decides.
    if s.is(1, "STATEMENT") {
        let mut depth = 0i32;
        for i in 2..s.toks.len() {
            match s.toks[i].kind {
                Kind::Punct(b'(') => depth += 1,
                Kind::Punct(b')') => depth -= 1,
                _ if depth == 0 && s.is(i, "FOR") => {
                    let inner = Stmt { sql: s.sql, toks: s.toks[i + 1..].to_vec() };
                    let class = classify_tokens(&inner);
                    // Session state changes inside SET STATEMENT last one statement only.
                    return if class.is_session_command() || matches!(class, Class::Begin { .. }) { Class::Write } else { class };
                }
                _ => {}
            }
        }
        return Class::Write;
    }
    if s.is_any(1, &["PASSWORD", "DEFAULT", "GLOBAL"]) {
        return Class::Write;
    }
    if s.is(1, "TRANSACTION") {
        return Class::SessionOnce;
    }
    let mut autocommit = None;
    for (i, t) in s.toks.iter().enumerate() {
        if t.kind == Kind::SysVar {
            let name = &s.text(i)[2..];
            if name.len() > 7 && name[..7].eq_ignore_ascii_case(b"global.") {
                return Class::Write;
            }
        }
        let is_autocommit = match t.kind {
            Kind::Word => s.is(i, "autocommit") && (i == 1 || s.punct(i - 1, b',') || s.is_any(i - 1, &["SESSION", "LOCAL"])),
            Kind::SysVar => strip_scope(&s.text(i)[2..]).eq_ignore_ascii_case(b"autocommit"),
            _ => false,
        };
        if is_autocommit && (s.punct(i + 1, b'=') || matches!(s.toks.get(i + 1), Some(t) if t.kind == Kind::Assign)) {
            let v = s.text(i + 2);
            let on = [&b"1"[..], b"ON", b"TRUE"].iter().any(|x| v.eq_ignore_ascii_case(x));
            let off = [&b"0"[..], b"OFF", b"FALSE"].iter().any(|x| v.eq_ignore_ascii_case(x));
            if on == off || s.toks.get(i + 3).is_some_and(|t| !matches!(t.kind, Kind::Punct(b','))) {
                // An expression the rules cannot evaluate: let the primary alone decide.
                return Class::Write;
            }
            autocommit = Some(on);
        }
    }
    match autocommit {
        Some(on) => Class::SetAutocommit(on),
        None => Class::SessionSet,
    }
}

/// True for a multi-statement packet one of whose statements changes session state (`SET`,
/// `USE`, temporary tables, table locks, transactions, text prepared statements): it runs on
/// the primary alone, so the session must stay there afterwards.
pub fn multi_changes_session(sql: &[u8]) -> bool {
    let toks = tokenize(sql);
    let s = Stmt { sql, toks };
    let mut start = true;
    for i in 0..s.toks.len() {
        if s.toks[i].kind == Kind::Semi {
            start = true;
            continue;
        }
        if start {
            start = false;
            let temporary = s.is(i, "CREATE") && (s.is(i + 1, "TEMPORARY") || (s.is(i + 1, "OR") && s.is(i + 3, "TEMPORARY")));
            if temporary || s.is_any(i, &["SET", "USE", "LOCK", "BEGIN", "START", "PREPARE", "XA"]) {
                return true;
            }
        }
    }
    false
}

/// The database named by a `USE` statement (backquotes removed).
pub fn use_database(sql: &[u8]) -> Option<String> {
    let toks = tokenize(sql);
    let t = toks.get(1)?;
    let raw = &sql[t.start..t.end];
    let name = match t.kind {
        Kind::Word => raw.to_vec(),
        Kind::Quoted if raw.len() >= 2 => {
            let inner = &raw[1..raw.len() - 1];
            let mut out = Vec::with_capacity(inner.len());
            let mut i = 0;
            while i < inner.len() {
                out.push(inner[i]);
                i += if inner[i] == b'`' { 2 } else { 1 };
            }
            out
        }
        _ => return None,
    };
    String::from_utf8(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_names() {
        assert_eq!(use_database(b"USE app").as_deref(), Some("app"));
        assert_eq!(use_database(b"use `my``db`;").as_deref(), Some("my`db"));
        assert_eq!(use_database(b"/* x */ USE `sb test`").as_deref(), Some("sb test"));
        assert_eq!(use_database(b"USE"), None);
    }

    #[test]
    fn tokenizer_skips_comments_but_not_executable_ones() {
        let sql = b"/*+ hint */ SELECT /*!40001 SQL_NO_CACHE */ 'a;b' -- x\n # y\n FROM t";
        let toks = tokenize(sql);
        let words: Vec<&[u8]> = toks.iter().map(|t| &sql[t.start..t.end]).collect();
        assert_eq!(words, vec![&b"SELECT"[..], b"SQL_NO_CACHE", b"'a;b'", b"FROM", b"t"]);
    }
}
