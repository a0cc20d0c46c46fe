//! A connection over TCP or a Unix socket, for both sides of the relay: clients on the same
//! host may connect to the router's Unix socket (`listen_socket`), and the router may reach a
//! server on its own host over that server's socket (`sockets`). On this kind of machine a
//! loopback TCP send runs the whole TCP/IP path for both ends in the sender's system call; a
//! Unix-socket send is a copy and a wakeup (db-bench measures the difference).
//!
//! Clients may ask for TLS, and the router may reach the servers over TLS ([`crate::tls`]).
//!
//! tokio has no either-stream for its own socket types (tokio-util's `Either` would be a new
//! dependency for the same ten delegating lines), hence this enum.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client connection after its TLS handshake (over TCP or the Unix socket).
    Tls(Box<tokio_rustls::server::TlsStream<crate::tls::Prefixed>>),
    /// A connection to a server over TLS (`backend_tls_ca`).
    TlsClient(Box<tokio_rustls::client::TlsStream<Stream>>),
    /// Taken apart for a moment (while the TLS handshake owns the connection); every
    /// operation fails.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed over")
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl Stream {
    /// Plain TCP: what the in-kernel paths can work with (TLS bytes mean nothing to them).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }


    /// Waits until the socket has something to read (data, end of stream or an error). For
    /// TLS, the socket under it (used only by the in-kernel paths, which TLS sessions do not
    /// take).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
            Stream::Tls(s) => Box::pin(s.get_ref().0.inner().readable()).await,
            Stream::TlsClient(s) => Box::pin(s.get_ref().0.readable()).await,
            Stream::Gone => Err(gone()),
        }
    }

    /// (local, peer) addresses of a TCP connection.
    pub fn tcp_addrs(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        match self {
            Stream::Tcp(s) => Some((s.local_addr().ok()?, s.peer_addr().ok()?)),
            Stream::Unix(_) | Stream::Tls(_) | Stream::TlsClient(_) | Stream::Gone => None,
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
            // Only the in-kernel paths read this way; TLS sessions do not take them.
            Stream::Tls(_) | Stream::TlsClient(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "raw read of a TLS connection")),
            Stream::Gone => Err(gone()),
        }
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().0.inner().as_raw_fd(),
            Stream::TlsClient(s) => s.get_ref().0.as_raw_fd(),
            Stream::Gone => -1,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}
