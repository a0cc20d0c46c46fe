//! MySQL wire-protocol pieces the router needs on both sides, on top of `mysql_common`'s
//! packet types: framing, the packets the router writes itself (OK, ERR, handshake), and
//! `mysql_native_password` without plaintext passwords.
//!
//! Result sets are relayed frame by frame (see `relay`): only the first bytes of each packet are
//! looked at, rows are never decoded or re-encoded.

use bytes::{Buf, BufMut, BytesMut};
use mysql_common::{
    constants::{CapabilityFlags, StatusFlags},
    io::ParseBuf,
    packets::{ErrPacket, ServerError, SqlState},
    proto::MySerialize,
};
use sha1::{Digest, Sha1};

/// The largest payload one frame carries; a longer packet continues in the next frame.
pub const MAX_FRAME: usize = 0xFF_FFFF;

/// Capabilities the router offers to clients. No TLS and no compression; `CLIENT_MYSQL`
/// (`LONG_PASSWORD`) is set, so MariaDB connectors use the plain MySQL protocol without
/// MariaDB's extended capabilities (metadata caching, bulk execution).
pub fn server_capabilities() -> CapabilityFlags {
    CapabilityFlags::CLIENT_LONG_PASSWORD
        | CapabilityFlags::CLIENT_FOUND_ROWS
        | CapabilityFlags::CLIENT_LONG_FLAG
        | CapabilityFlags::CLIENT_CONNECT_WITH_DB
        | CapabilityFlags::CLIENT_ODBC
        | CapabilityFlags::CLIENT_LOCAL_FILES
        | CapabilityFlags::CLIENT_IGNORE_SPACE
        | CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_INTERACTIVE
        | CapabilityFlags::CLIENT_IGNORE_SIGPIPE
        | CapabilityFlags::CLIENT_TRANSACTIONS
        | CapabilityFlags::CLIENT_RESERVED
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_MULTI_STATEMENTS
        | CapabilityFlags::CLIENT_MULTI_RESULTS
        | CapabilityFlags::CLIENT_PS_MULTI_RESULTS
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_CONNECT_ATTRS
        | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CapabilityFlags::CLIENT_SESSION_TRACK
        | CapabilityFlags::CLIENT_DEPRECATE_EOF
}

/// Header of the frame at the start of `buf`: (payload length, sequence id), if 4 bytes are there.
#[inline]
pub fn frame_header(buf: &[u8]) -> Option<(usize, u8)> {
    if buf.len() < 4 {
        return None;
    }
    Some((buf[0] as usize | (buf[1] as usize) << 8 | (buf[2] as usize) << 16, buf[3]))
}

/// Appends `payload` as one packet (split into frames when longer than 16 MiB) starting at
/// sequence id `seq`; returns the next sequence id.
pub fn put_packet(out: &mut BytesMut, seq: u8, payload: &[u8]) -> u8 {
    let mut src = payload;
    mysql_common::proto::codec::packet_to_chunks(seq, &mut src, out)
}

/// Reads a length-encoded integer; `None` when truncated or for the NULL/ERR markers.
pub fn read_lenenc(buf: &mut &[u8]) -> Option<u64> {
    let first = *buf.first()?;
    let (len, v) = match first {
        0..=0xFA => (1, first as u64),
        0xFC if buf.len() >= 3 => (3, u16::from_le_bytes([buf[1], buf[2]]) as u64),
        0xFD if buf.len() >= 4 => (4, u32::from_le_bytes([buf[1], buf[2], buf[3], 0]) as u64),
        0xFE if buf.len() >= 9 => (9, u64::from_le_bytes(buf[1..9].try_into().ok()?)),
        _ => return None,
    };
    buf.advance(len);
    Some(v)
}

fn put_lenenc(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0xFA => out.push(v as u8),
        0xFB..=0xFFFF => {
            out.push(0xFC);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xFF_FFFF => {
            out.push(0xFD);
            out.extend_from_slice(&(v as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xFE);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The parts of an OK packet (header 0x00, or 0xFE as a result-set terminator with
/// `CLIENT_DEPRECATE_EOF`) the router acts on.
#[derive(Debug, Clone, Copy)]
pub struct OkHead {
    pub status: StatusFlags,
    /// Offset of the info field (after status and warnings).
    pub rest: usize,
}

pub fn parse_ok_head(payload: &[u8]) -> Option<OkHead> {
    let mut b = payload.get(1..)?;
    read_lenenc(&mut b)?;
    read_lenenc(&mut b)?;
    if b.len() < 4 {
        return None;
    }
    let status = StatusFlags::from_bits_truncate(u16::from_le_bytes([b[0], b[1]]));
    Some(OkHead { status, rest: payload.len() - b.len() + 4 })
}

/// Status flags of an old-style EOF packet (0xFE, warnings, status).
pub fn eof_status(payload: &[u8]) -> StatusFlags {
    if payload.len() >= 5 {
        StatusFlags::from_bits_truncate(u16::from_le_bytes([payload[3], payload[4]]))
    } else {
        StatusFlags::empty()
    }
}

/// The OK packet for a client that did not ask for `CLIENT_SESSION_TRACK`, from one of a
/// backend connection that did: the session-state block and its flag removed, info kept.
pub fn strip_session_state(payload: &[u8], head: OkHead) -> Vec<u8> {
    let mut out = payload[..head.rest].to_vec();
    let status = head.status - StatusFlags::SERVER_SESSION_STATE_CHANGED;
    let at = head.rest - 4;
    out[at..at + 2].copy_from_slice(&status.bits().to_le_bytes());
    let mut rest = &payload[head.rest..];
    if let Some(len) = read_lenenc(&mut rest) {
        let len = len as usize;
        if len > 0 && len <= rest.len() {
            put_lenenc(&mut out, len as u64);
            out.extend_from_slice(&rest[..len]);
        }
    }
    out
}

/// `last_gtid` from the session-state block of an OK packet, if the server reported one.
pub fn last_gtid(payload: &[u8], caps: CapabilityFlags) -> Option<String> {
    use mysql_common::packets::{session_state_change::SessionStateChange, CommonOkPacket, OkPacketDeserializer, ResultSetTerminator};
    let ok = match payload.first()? {
        0x00 => ParseBuf(payload).parse::<OkPacketDeserializer<CommonOkPacket>>(caps).ok()?.into_inner(),
        _ => ParseBuf(payload).parse::<OkPacketDeserializer<ResultSetTerminator>>(caps).ok()?.into_inner(),
    };
    let mut found = None;
    for info in ok.session_state_info().ok()? {
        if let Ok(SessionStateChange::SystemVariables(vars)) = info.decode() {
            for var in vars {
                if var.name_bytes() == b"last_gtid" && !var.value_bytes().is_empty() {
                    found = Some(var.value_str().into_owned());
                }
            }
        }
    }
    found
}

/// An OK packet payload.
pub fn ok_payload(status: StatusFlags) -> Vec<u8> {
    let mut p = vec![0x00, 0x00, 0x00];
    p.extend_from_slice(&status.bits().to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    p
}

/// An ERR packet payload.
pub fn err_payload(code: u16, state: &[u8; 5], message: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + message.len());
    ErrPacket::Error(ServerError::new(code, Some(SqlState::new(*state)), message.as_bytes())).serialize(&mut p);
    p
}

/// Error codes and SQL states the router uses for its own errors.
pub mod codes {
    /// ER_ACCESS_DENIED_ERROR
    pub const ACCESS_DENIED: (u16, &[u8; 5]) = (1045, b"28000");
    /// ER_UNKNOWN_COM_ERROR
    pub const UNKNOWN_COMMAND: (u16, &[u8; 5]) = (1047, b"08S01");
    /// ER_HANDSHAKE_ERROR
    pub const BAD_HANDSHAKE: (u16, &[u8; 5]) = (1043, b"08S01");
    /// ER_MALFORMED_PACKET
    pub const MALFORMED: (u16, &[u8; 5]) = (1835, b"HY000");
    /// ER_UNKNOWN_STMT_HANDLER
    pub const UNKNOWN_STMT: (u16, &[u8; 5]) = (1243, b"HY000");
    /// CR_SERVER_LOST-like: a backend went away or could not be reached (2013 is a client code;
    /// servers use 1927 ER_CONNECTION_KILLED for "connection was killed").
    pub const BACKEND_LOST: (u16, &[u8; 5]) = (1927, b"70100");
    /// ER_SECURE_TRANSPORT_REQUIRED: a plain connection where TLS is required.
    pub const INSECURE_TRANSPORT: (u16, &[u8; 5]) = (3159, b"HY000");
    /// ER_OPTION_PREVENTS_STATEMENT-like: no writable primary right now.
    pub const NO_PRIMARY: (u16, &[u8; 5]) = (1290, b"HY000");
}

/// `SHA1(data...)`.
pub fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// What the server stores for a `mysql_native_password` account: `SHA1(SHA1(password))`.
pub fn native_stored_hash(password: &[u8]) -> [u8; 20] {
    sha1(&[&sha1(&[password])])
}

/// Parses the `*HEX` form MariaDB shows in `mysql.user` / `PASSWORD('...')`.
pub fn parse_native_hash(s: &str) -> Option<[u8; 20]> {
    let hex = s.strip_prefix('*')?;
    if hex.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks a client's `mysql_native_password` token against the stored hash. On success
/// returns `SHA1(password)`, which is all the router needs to log into a backend as the same
/// user (`token = SHA1(pw) XOR SHA1(nonce || SHA1(SHA1(pw)))`, so `SHA1(pw)` falls out of the
/// token and is proved by hashing it once more).
pub fn verify_native(nonce: &[u8], token: &[u8], stored: &[u8; 20]) -> Option<[u8; 20]> {
    if token.len() != 20 {
        return None;
    }
    let mask = sha1(&[nonce, stored]);
    let mut candidate = [0u8; 20];
    for i in 0..20 {
        candidate[i] = token[i] ^ mask[i];
    }
    (sha1(&[&candidate]) == *stored).then_some(candidate)
}

/// The `mysql_native_password` token for `nonce`, from `SHA1(password)`.
pub fn native_token(nonce: &[u8], sha1_password: &[u8; 20]) -> [u8; 20] {
    let stored = sha1(&[sha1_password]);
    let mask = sha1(&[nonce, &stored]);
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = sha1_password[i] ^ mask[i];
    }
    out
}

/// A `COM_CHANGE_USER` packet's fields. Parsed here because mysql_common's `ComChangeUser`
/// can be built and parsed but has no accessors for what it parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct ChangeUser<'a> {
    pub user: &'a [u8],
    /// The auth response (`CLIENT_SECURE_CONNECTION` form: a length byte, then the bytes).
    pub auth: &'a [u8],
    pub db: &'a [u8],
    /// The new connection collation, when the client sent one.
    pub collation: Option<u16>,
    /// The auth plugin the response is for (`CLIENT_PLUGIN_AUTH`), when sent.
    pub plugin: Option<&'a [u8]>,
}

/// Parses a `COM_CHANGE_USER` payload (command byte included); `None` if it is malformed.
/// Connection attributes after the plugin name are not read (the router keeps none).
pub fn parse_change_user(payload: &[u8], caps: CapabilityFlags) -> Option<ChangeUser<'_>> {
    fn nul_str<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let end = b.iter().position(|&c| c == 0)?;
        let (s, rest) = b.split_at(end);
        *b = &rest[1..];
        Some(s)
    }
    let mut b = payload.strip_prefix(&[0x11])?;
    let user = nul_str(&mut b)?;
    let (&len, rest) = b.split_first()?;
    let auth = rest.get(..usize::from(len))?;
    b = &rest[usize::from(len)..];
    let db = nul_str(&mut b)?;
    let mut collation = None;
    let mut plugin = None;
    if b.len() >= 2 {
        collation = Some(u16::from_le_bytes([b[0], b[1]]));
        b = &b[2..];
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && !b.is_empty() {
            plugin = Some(nul_str(&mut b)?);
        }
    }
    Some(ChangeUser { user, auth, db, collation, plugin })
}

/// A 20-byte scramble of printable characters, as servers send.
pub fn new_scramble() -> [u8; 20] {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut s = [0u8; 20];
    for b in &mut s {
        *b = rng.gen_range(b'!'..=b'~');
    }
    s
}

/// Writes a lenenc string (for building packets by hand).
pub fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.put_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql_common::scramble::scramble_native;

    #[test]
    fn change_user_packets_parse_as_mysql_common_writes_them() {
        use mysql_common::packets::{AuthPlugin, ComChangeUser, ComChangeUserMoreData};
        let caps = CapabilityFlags::CLIENT_PROTOCOL_41 | CapabilityFlags::CLIENT_PLUGIN_AUTH;
        let mut p = Vec::new();
        ComChangeUser::new()
            .with_user(Some(&b"sbtest"[..]))
            .with_database(Some(&b"sbtest"[..]))
            .with_auth_plugin_data(Some(&[7u8; 20][..]))
            .with_more_data(Some(ComChangeUserMoreData::new(45).with_auth_plugin(Some(AuthPlugin::MysqlNativePassword))))
            .serialize(&mut p);
        let got = parse_change_user(&p, caps).expect("parses");
        assert_eq!(
            got,
            ChangeUser { user: b"sbtest", auth: &[7; 20], db: b"sbtest", collation: Some(45), plugin: Some(b"mysql_native_password") }
        );
        // Without the optional part, and with an empty password and database.
        let mut p = Vec::new();
        ComChangeUser::new().with_user(Some(&b"app"[..])).serialize(&mut p);
        assert_eq!(parse_change_user(&p, caps), Some(ChangeUser { user: b"app", auth: b"", db: b"", collation: None, plugin: None }));
        // Truncated anywhere: refused, never a panic.
        let mut full = Vec::new();
        ComChangeUser::new()
            .with_user(Some(&b"u"[..]))
            .with_auth_plugin_data(Some(&[1u8; 20][..]))
            .with_database(Some(&b"d"[..]))
            .with_more_data(Some(ComChangeUserMoreData::new(45).with_auth_plugin(Some(AuthPlugin::MysqlNativePassword))))
            .serialize(&mut full);
        // 0x11 "u" NUL (3), length and 20 bytes (24), "d" NUL (26): complete; a lone byte
        // after it is no collation (27); the collation (28); the plugin's name up to its NUL
        // (50); the empty attributes (51).
        assert_eq!(full.len(), 51);
        for cut in 0..full.len() {
            let parsed = parse_change_user(&full[..cut], caps);
            let complete_enough = (26..=28).contains(&cut) || cut >= 50;
            assert_eq!(parsed.is_some(), complete_enough, "cut at {cut}: {parsed:?}");
        }
        assert_eq!(parse_change_user(b"\x03app\0", caps), None, "another command");
    }

    #[test]
    fn native_auth_round_trip() {
        let nonce = new_scramble();
        let token = scramble_native(&nonce, b"s3cret").unwrap();
        let stored = native_stored_hash(b"s3cret");
        let sha1pw = verify_native(&nonce, &token, &stored).expect("right password verifies");
        assert_eq!(native_token(&nonce, &sha1pw), token);
        let wrong = scramble_native(&nonce, b"other").unwrap();
        assert!(verify_native(&nonce, &wrong, &stored).is_none());
        assert!(verify_native(&nonce, &token[..19], &stored).is_none());
    }

    #[test]
    fn native_hash_text_form() {
        // SELECT PASSWORD('apppw') on MariaDB
        let stored = native_stored_hash(b"apppw");
        let text = format!("*{}", stored.iter().map(|b| format!("{b:02X}")).collect::<String>());
        assert_eq!(parse_native_hash(&text), Some(stored));
        assert_eq!(parse_native_hash("2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"), None);
        assert_eq!(parse_native_hash("*XYZ"), None);
    }

    #[test]
    fn session_state_is_stripped_for_old_clients() {
        // OK: affected 1, insert id 0, status AUTOCOMMIT|STATE_CHANGED, 0 warnings, info "", state
        let mut p = vec![0x00, 1, 0];
        p.extend_from_slice(&(0x0002u16 | 0x4000).to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p.push(0); // empty info
        p.extend_from_slice(&[5, 0, 3, 1, b'x', 0]);
        let head = parse_ok_head(&p).unwrap();
        assert!(head.status.contains(StatusFlags::SERVER_SESSION_STATE_CHANGED));
        let s = strip_session_state(&p, head);
        assert_eq!(s, vec![0x00, 1, 0, 0x02, 0x00, 0, 0]);
    }

    #[test]
    fn lenenc() {
        for v in [0u64, 250, 251, 65535, 65536, 0xFF_FFFF, 0x100_0000, u64::MAX] {
            let mut out = Vec::new();
            put_lenenc(&mut out, v);
            let mut s = &out[..];
            assert_eq!(read_lenenc(&mut s), Some(v));
            assert!(s.is_empty());
        }
        assert_eq!(read_lenenc(&mut &[0xFC, 1][..]), None);
    }
}
