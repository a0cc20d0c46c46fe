//! A minimal HTTP/1.1 client over a `TcpStream`, for tests that must control connections
//! exactly (one connection per request, or many requests on one keep-alive connection).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn { reader: BufReader::new(s) })
    }

    /// Connects from a chosen local port, so that a series of connections are distinct
    /// 5-tuples (the kernel may otherwise reuse a port at once, and a reused 5-tuple is,
    /// to the balancer, the same flow).
    pub fn open_from(local_port: u16, addr: SocketAddr) -> std::io::Result<Conn> {
        Self::open_from_within(local_port, addr, Duration::from_secs(5))
    }

    /// [`Conn::open_from`] with a bound on connecting and on each read.
    pub fn open_from_within(local_port: u16, addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], local_port)).into())?;
        s.connect_timeout(&addr.into(), timeout)?;
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(timeout * 2))?;
        Ok(Conn { reader: BufReader::new(s) })
    }

    /// Sends a GET and reads the whole response: `(status, body)`.
    pub fn get(&mut self, path: &str, keep_alive: bool) -> std::io::Result<(u16, Vec<u8>)> {
        let conn = if keep_alive { "keep-alive" } else { "close" };
        // One write: several small ones would wait on Nagle and the peer's delayed ACK.
        let req = format!("GET {path} HTTP/1.1\r\nHost: vip\r\nConnection: {conn}\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes())?;
        self.read_response()
    }

    fn read_response(&mut self) -> std::io::Result<(u16, Vec<u8>)> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line {line:?}"))
        })?;
        let mut len = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                if n == 0 {
                    line.clear();
                    self.reader.read_line(&mut line)?;
                    break;
                }
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
        } else {
            self.reader.read_to_end(&mut body)?;
        }
        Ok((status, body))
    }
}

/// The `node` field of a `/whoami` body.
pub fn node_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("whoami is not JSON ({e}): {}", String::from_utf8_lossy(body)));
    v["node"].as_str().expect("node field").to_string()
}
