//! Zero-copy responses for cached static files on plain HTTP connections, the way nginx
//! sends files (`sendfile on`).
//!
//! - [`pack`] puts the cached bodies of a release into one heap buffer (a *region*) and writes
//!   the same bytes once to a private file: an unlinked `O_TMPFILE` in the temporary directory
//!   (no name, so only this process reaches it), or else a sealed memfd. The bodies become
//!   `Bytes` slices of the region, which keep it and its file alive: a reload frees the old
//!   release's region only when the last response using it is gone. Why a file of our own
//!   rather than the release's: it holds exactly the bytes verified against the manifest,
//!   whatever happens to the release directory later. Why `O_TMPFILE` first: on a disk file
//!   system the kernel splices the file's pages in batches, while a memfd (shmem) looks up
//!   each page (about 3% more CPU per 100 KiB response measured here).
//! - [`SendfileStream`] is the IO object hyper writes to. hyper writes a response as a vector
//!   of buffers (its head, then the body `Bytes` as is: the queue write strategy, chosen
//!   because this stream is vectored); when one of them lies inside a registered region, the
//!   buffers before it go out with `sendmsg(MSG_MORE)` and that one with `sendfile(2)` from
//!   the memfd, so the kernel sends the pages without copying them into the socket. The
//!   result is a byte count, as `writev` would return; partial writes and `EAGAIN` are
//!   reported the same way, so hyper's write loop needs nothing special.
//!
//! Written by hand because no library does this: hyper's IO traits see only byte slices,
//! tokio has no `sendfile`, and serving through a file-streaming body would lose hyper's
//! keep-alive and HTTP/2 handling. TLS connections do not use it (rustls must encrypt the
//! bytes in memory), nor do bodies below [`SENDFILE_MIN`] (one `writev` costs less than
//! `sendmsg` plus `sendfile`).

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Buffers at least this long that lie in a region are sent with `sendfile`.
pub const SENDFILE_MIN: usize = 16 * 1024;

/// A registered region: its address range and the file holding the same bytes.
struct Registered {
    start: usize,
    end: usize,
    fd: RawFd,
}

/// Every live region. A region is registered once filled and unregistered before it is
/// freed, so an entry whose range contains a buffer someone holds is that buffer's
/// region, and its fd stays open while the buffer is borrowed. Few entries (one per release
/// being served or still answering), read once per large write.
static REGIONS: RwLock<Vec<Registered>> = RwLock::new(Vec::new());

/// The file and offset of `buf`, if it lies inside a region.
fn lookup(buf: &[u8]) -> Option<(RawFd, u64)> {
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let regions = REGIONS.read().unwrap_or_else(PoisonError::into_inner);
    regions.iter().find(|r| r.start <= start && end <= r.end).map(|r| (r.fd, (start - r.start) as u64))
}

/// Bodies on the heap and the file holding the same bytes.
struct Region {
    data: Box<[u8]>,
    /// Kept open for the registry, which hands out its fd.
    _file: File,
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let start = self.data.as_ptr() as usize;
        REGIONS.write().unwrap_or_else(PoisonError::into_inner).retain(|r| r.start != start);
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A file only this process can reach: an unlinked temporary file, or a memfd.
fn private_file() -> io::Result<File> {
    let tmp = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(std::env::temp_dir());
    if let Ok(file) = tmp {
        return Ok(file);
    }
    // SAFETY: a NUL-terminated name and flags; the returned fd is owned by the File below.
    let fd = check(unsafe { libc::memfd_create(c"web-app-files".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: fd is a new file descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The same bytes as `bodies`, in order, each a slice of one new region.
pub fn pack(bodies: &[&[u8]]) -> io::Result<Vec<Bytes>> {
    let data: Box<[u8]> = bodies.concat().into_boxed_slice();
    if data.is_empty() {
        return Ok(bodies.iter().map(|_| Bytes::new()).collect());
    }
    let mut file = private_file()?;
    file.write_all(&data)?;
    // A memfd is sealed: nothing can change its bytes any more. (Not possible, and not needed,
    // for a temporary file no one else can open.)
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own fd; EINVAL on a file that is not a memfd.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    let start = data.as_ptr() as usize;
    REGIONS.write().unwrap_or_else(PoisonError::into_inner).push(Registered {
        start,
        end: start + data.len(),
        fd: file.as_raw_fd(),
    });
    let whole = Bytes::from_owner(Region { data, _file: file });
    let mut offset = 0;
    Ok(bodies
        .iter()
        .map(|body| {
            let slice = whole.slice(offset..offset + body.len());
            offset += body.len();
            slice
        })
        .collect())
}

/// The first bytes an HTTP/2 client with prior knowledge sends.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A TCP connection whose writes of region bytes go out with `sendfile` (see the module).
/// It can also read the start of the connection ahead ([`SendfileStream::read_preface`]) and
/// replays those bytes to its reader first.
///
/// The last response: once [`SendfileStream::closing`] says the response being written is
/// the connection's last (it ends with a close), its bytes are held back (`MSG_MORE`, or
/// `TCP_CORK` before `sendfile`, as nginx's `tcp_nopush` does) until the shutdown that
/// follows, which sends the tail of the response and the FIN in one segment: one segment less
/// for both ends to handle per connection. Should anything but the shutdown follow (a read),
/// what is held is pushed out first.
pub struct SendfileStream {
    stream: TcpStream,
    /// Bytes read ahead (by `read_preface`, or [`crate::quick`]), returned by the next reads.
    ahead: bytes::BytesMut,
    closing: Arc<AtomicBool>,
    /// Bytes may be held back: `Some(corked)` (with `TCP_CORK` set when `corked`).
    holding: Option<bool>,
}

impl SendfileStream {
    pub fn new(stream: TcpStream) -> SendfileStream {
        SendfileStream::with_ahead(stream, bytes::BytesMut::new())
    }

    /// A connection whose first bytes were read already: `ahead`.
    pub fn with_ahead(stream: TcpStream, ahead: bytes::BytesMut) -> SendfileStream {
        SendfileStream { stream, ahead, closing: Arc::default(), holding: None }
    }

    /// A connection whose last response [`write_last`] wrote in part (`corked`: it set
    /// `TCP_CORK`): the rest is held back as well, until the shutdown.
    pub fn finishing(stream: TcpStream, corked: bool) -> SendfileStream {
        SendfileStream { stream, ahead: bytes::BytesMut::new(), closing: Arc::new(AtomicBool::new(true)), holding: Some(corked) }
    }

    /// Set to true when the response about to be written is the last on this connection (see
    /// the type). Only when that is certain: held bytes wait for the shutdown.
    pub fn closing(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.closing)
    }

    fn last_response(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// `TCP_CORK` on or off (off sends what it held).
    fn cork(&self, on: bool) -> io::Result<()> {
        cork(&self.stream, on)
    }

    /// Sends what is held back, if anything may be: uncorks, or (after `MSG_MORE`) sets
    /// `TCP_NODELAY` again, which pushes the pending segments.
    fn release(&mut self) -> io::Result<()> {
        match self.holding.take() {
            Some(true) => self.cork(false),
            Some(false) => self.stream.set_nodelay(true),
            None => Ok(()),
        }
    }

    /// Reads the first bytes of the connection (kept, and read again by the next reads) until
    /// they show whether the client speaks HTTP/2 with prior knowledge (true) or not. One
    /// read of up to 2 KiB usually decides, and leaves hyper a whole request head. End of
    /// stream decides "not HTTP/2" (hyper then sees it too).
    pub async fn read_preface(&mut self) -> io::Result<bool> {
        if let Some(h2) = self.try_read_preface()? {
            return Ok(h2);
        }
        loop {
            self.stream.readable().await?;
            // Through tokio this time, so that its readiness is cleared when the socket has
            // nothing after all (and the next `readable` waits).
            let stream = &self.stream;
            let ahead = &mut self.ahead;
            match stream.try_io(Interest::READABLE, || recv_preface(stream, ahead)) {
                Ok(Some(h2)) => return Ok(h2),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// [`SendfileStream::read_preface`] with what the socket holds now: `None` if that does
    /// not decide yet. It asks the socket itself, not tokio's idea of its readiness: a
    /// connection just accepted usually holds its request already, while tokio learns that
    /// only on its next turn (a wake-up and a poll of the connection's task later).
    pub fn try_read_preface(&mut self) -> io::Result<Option<bool>> {
        match recv_preface(&self.stream, &mut self.ahead) {
            Ok(Some(h2)) => Ok(Some(h2)),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Runs the non-blocking socket operation `op` once the socket is writable, as often as
    /// it says `WouldBlock`.
    ///
    /// It tries `op` once first, whatever tokio knows of the socket: a socket is usually
    /// writable, and tokio learns that of a connection just accepted only on the next turn of
    /// its event loop (readiness starts empty), so the first response would wait for that turn.
    fn poll_op(&self, cx: &mut Context<'_>, mut op: impl FnMut() -> io::Result<usize>) -> Poll<io::Result<usize>> {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            result => return Poll::Ready(result),
        }
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_io(Interest::WRITABLE, &mut op) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn sendfile(&self, at: (RawFd, u64), len: usize) -> io::Result<usize> {
        sendfile(&self.stream, at, len)
    }

    /// `sendmsg` of `bufs` with `MSG_MORE` (more follows at once: no short segment for the
    /// response head alone, or the FIN of the shutdown comes next).
    fn send_more(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs, libc::MSG_MORE)
    }

    /// `sendmsg` of `bufs` with `flags`.
    fn send(&self, bufs: &[IoSlice<'_>], flags: libc::c_int) -> io::Result<usize> {
        send(&self.stream, bufs, flags)
    }
}

/// `TCP_CORK` on or off on `stream` (off sends what it held).
fn cork(stream: &impl AsRawFd, on: bool) -> io::Result<()> {
    let value: libc::c_int = on.into();
    // SAFETY: setsockopt on a socket with a pointer to an int of the size given.
    check(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `sendfile` of `len` bytes of a region's file from `offset` to `stream`.
fn sendfile(stream: &impl AsRawFd, (fd, offset): (RawFd, u64), len: usize) -> io::Result<usize> {
    let mut offset = offset as libc::off_t;
    loop {
        // SAFETY: both fds are open (the socket is the caller's; the region's file is kept
        // open by the region the caller's buffer borrows from); the kernel writes only `offset`.
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), fd, &mut offset, len) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes `bufs`, the last response of a connection, to `stream` without waiting (a socket
/// that tokio does not know: see `quick::answer_at_once`), held back the way
/// [`SendfileStream`] holds a last response until the close: `MSG_MORE`, or `TCP_CORK` and
/// `sendfile` for the bytes of a region. Returns the bytes written (fewer than all when the
/// socket is full) and whether it corked.
pub(crate) fn write_last(stream: &impl AsRawFd, mut bufs: &mut [IoSlice<'_>]) -> io::Result<(usize, bool)> {
    let region = first_in_region(bufs).is_some();
    if region {
        cork(stream, true)?;
    }
    let mut written = 0;
    while !bufs.is_empty() {
        let sent = match first_in_region(bufs) {
            Some((0, at)) => sendfile(stream, at, bufs[0].len()),
            Some((i, _)) => send(stream, &bufs[..i], libc::MSG_MORE),
            None => send(stream, bufs, libc::MSG_MORE),
        };
        match sent {
            Ok(n) if n > 0 => {
                written += n;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok((written, region))
}

/// `sendmsg` of `bufs` on `stream` with `flags` (never `SIGPIPE`).
fn send(stream: &impl AsRawFd, bufs: &[IoSlice<'_>], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix (documented by std).
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
    loop {
        // SAFETY: msg points to `bufs`, valid for the call; the kernel only reads them.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A TCP connection whose writes go to the socket at once and wait for tokio's readiness only
/// when the socket is full (see [`SendfileStream`]'s `poll_op`), and whose first read asks the
/// socket too: what TLS runs on, so that neither the client hello (there on accept) nor the
/// first handshake flight waits for a turn of the event loop.
pub struct EagerStream {
    stream: TcpStream,
    fresh: bool,
}

impl EagerStream {
    pub fn new(stream: TcpStream) -> EagerStream {
        EagerStream { stream, fresh: true }
    }
}

impl AsyncRead for EagerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.fresh) {
            // SAFETY: recv writes at most the unfilled length into the unfilled part, which
            // is then marked initialised and filled for exactly what it wrote.
            let n = unsafe {
                let unfilled = buf.unfilled_mut();
                libc::recv(self.stream.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len(), libc::MSG_DONTWAIT)
            };
            if n >= 0 {
                // SAFETY: see above.
                unsafe { buf.assume_init(n as usize) };
                buf.advance(n as usize);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for EagerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match send(&self.stream, bufs, 0) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pin::new(&mut self.stream).poll_write_vectored(cx, bufs),
            result => Poll::Ready(result),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One `recv` from `stream` into the spare capacity of `buf` (at least 1 KiB of it).
fn recv_into(stream: &impl AsRawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(2048);
    }
    recv_spare(stream, buf)
}

/// One `recv` from `stream` into the spare capacity `buf` has.
fn recv_spare(stream: &impl AsRawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    loop {
        // SAFETY: recv writes at most `spare.len()` bytes into the spare capacity of the
        // buffer, which stays alive and unaliased for the call; the socket is ours.
        let n = unsafe { libc::recv(stream.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            // SAFETY: recv initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads from `stream` into `buf` (with `recv` on the socket itself) until the bytes decide
/// whether they start an HTTP/2 preface: `Some(h2)`, `None` for not yet (more may come, and a
/// `WouldBlock` error when nothing came). Bytes already in `buf` count first.
pub(crate) fn recv_preface(stream: &impl AsRawFd, buf: &mut bytes::BytesMut) -> io::Result<Option<bool>> {
    // On the heap, not in the future: a connection's future is moved when it is spawned.
    if buf.capacity() == 0 {
        buf.reserve(2048);
    }
    loop {
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Ok(Some(false));
        }
        if seen == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(2048);
        }
        if recv_spare(stream, buf)? == 0 {
            return Ok(Some(false));
        }
    }
}

/// The first buffer worth `sendfile`, with its index and location.
fn first_in_region(bufs: &[IoSlice<'_>]) -> Option<(usize, (RawFd, u64))> {
    bufs.iter().enumerate().find_map(|(i, b)| if b.len() >= SENDFILE_MIN { lookup(b).map(|at| (i, at)) } else { None })
}

impl crate::quick::ReadAhead for SendfileStream {
    /// Nothing unread in the socket (`FIONREAD`): a close then sends what is held back and
    /// the FIN, as nginx's close does, one system call fewer than a shutdown and a close.
    fn may_just_close(&mut self) -> bool {
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the pointer given; the socket is ours.
        let ok = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut unread) } == 0;
        ok && unread == 0 && self.ahead.is_empty()
    }

    fn ahead(&mut self) -> &mut bytes::BytesMut {
        &mut self.ahead
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.holding.is_some() {
            self.release()?;
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            let (stream, ahead) = (&self.stream, &mut self.ahead);
            match stream.try_io(Interest::READABLE, || recv_into(stream, ahead)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.holding.is_some() {
            // Not closing after all: the peer must see everything before we wait for it.
            self.release()?;
        }
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let last = self.last_response();
        let Some((i, at)) = first_in_region(bufs) else {
            if last {
                self.holding.get_or_insert(false);
                return self.poll_op(cx, || self.send_more(bufs));
            }
            return self.poll_op(cx, || self.send(bufs, 0));
        };
        if last && self.holding != Some(true) {
            // sendfile has no MSG_MORE: cork, so that its last segment waits for the FIN.
            self.cork(true)?;
            self.holding = Some(true);
        }
        let len = bufs[i].len();
        if i == 0 {
            return self.poll_op(cx, || self.sendfile(at, len));
        }
        let head = &bufs[..i];
        let head_len: usize = head.iter().map(|b| b.len()).sum();
        let sent = ready!(self.poll_op(cx, || self.send_more(head)))?;
        if sent < head_len {
            return Poll::Ready(Ok(sent));
        }
        // The head is out: add what the socket takes of the file now. If it takes nothing
        // (full, or an error), the head's count is the answer and the next write retries.
        match self.sendfile(at, len) {
            Ok(n) => Poll::Ready(Ok(sent + n)),
            Err(_) => Poll::Ready(Ok(sent)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// A real `shutdown(2)`, though closing the socket would send a FIN too: with request
    /// bytes left unread, a close alone sends a reset instead, and the client may lose the
    /// response (an error answered before the body was read).
    /// The FIN goes out with whatever is held back (the kernel pushes it, cork or not).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
        self.holding = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Tests that look at the registry run one at a time (a region freed by one test could be
    /// mapped again at the same address by another).
    static REGISTRY_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn pack_keeps_the_bytes_and_registers_the_region() {
        let _one = REGISTRY_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b, c) = (data(100, 1), data(0, 2), data(SENDFILE_MIN * 3, 3));
        assert!(pack(&[&b]).unwrap()[0].is_empty());
        let packed = pack(&[&a, &b, &c]).unwrap();
        assert_eq!(packed.iter().map(|p| p.to_vec()).collect::<Vec<_>>(), vec![a.clone(), b, c.clone()]);
        let (fd, offset) = lookup(&packed[2]).expect("packed bytes are in a region");
        assert_eq!(offset, 100);
        assert!(lookup(&c).is_none(), "a heap copy is not in a region");
        // The region lives as long as any slice of it: drop all but one, the fd still works.
        let kept = packed[2].slice(10..);
        drop(packed);
        let mut buf = vec![0u8; 16];
        // SAFETY: pread into a buffer of 16 bytes.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), 16, 110) };
        assert_eq!(n, 16);
        assert_eq!(buf, c[10..26]);
        assert_eq!(lookup(&kept), Some((fd, 110)));
        let start = kept.as_ptr() as usize;
        drop(kept);
        let gone = REGIONS.read().unwrap().iter().any(|r| r.start <= start && start < r.end);
        assert!(!gone, "the last slice dropped unregisters the region");
    }

    #[test]
    fn the_file_holds_the_same_bytes() {
        let _one = REGISTRY_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        let body = data(SENDFILE_MIN + 5, 9);
        let packed = pack(&[b"x", &body]).unwrap();
        let (fd, offset) = lookup(&packed[1]).unwrap();
        assert_eq!(offset, 1);
        let mut buf = vec![0u8; body.len()];
        // SAFETY: pread into a buffer of its length.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 1) };
        assert_eq!(n as usize, body.len());
        assert!(buf == body);
    }

    /// Head + file through `poll_write_vectored` to a reader that drains slowly through a
    /// small receive buffer: every partial write and `EAGAIN` path, and the bytes must arrive
    /// exact and in order.
    #[tokio::test]
    async fn vectored_writes_with_a_slow_reader_are_byte_exact() {
        let file = data(3 * 1024 * 1024 + 7, 5);
        let packed = pack(&[&file]).unwrap();
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3145735\r\n\r\n".to_vec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = socket.connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = SendfileStream::new(server);

        let expected = [head.clone(), file.clone(), head.clone(), file.clone()].concat();
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 1000];
            loop {
                let n = client.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                if got.len().is_multiple_of(7) {
                    tokio::task::yield_now().await;
                }
            }
        });
        // Two responses back to back, as hyper would write them: advance over what each call
        // took, the way a Buf queue does.
        let mut parts: Vec<Bytes> = vec![Bytes::from(head.clone()), packed[0].clone(), Bytes::from(head), packed[0].clone()];
        let (mut calls, mut sendfile_calls) = (0, 0);
        while !parts.is_empty() {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            if first_in_region(&slices).is_some() {
                sendfile_calls += 1;
            }
            let mut n = server.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            calls += 1;
            while n > 0 {
                let take = n.min(parts[0].len());
                let _ = parts[0].split_to(take);
                n -= take;
                if parts[0].is_empty() {
                    parts.remove(0);
                }
            }
        }
        drop(server);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
        assert!(calls > 4, "the slow reader forced partial writes ({calls} calls)");
        assert!(sendfile_calls > 0);
    }

    /// What the client sends first decides the protocol, and every byte read ahead is read
    /// again, in order, whatever the read sizes.
    #[tokio::test]
    async fn preface_detection_replays_what_it_read() {
        let check = |parts: Vec<&'static [u8]>, h2: bool| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let all: Vec<u8> = parts.concat();
            let writer = tokio::spawn(async move {
                for part in parts {
                    client.write_all(part).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                client.shutdown().await.unwrap();
                client
            });
            let mut server = SendfileStream::new(server);
            assert_eq!(server.read_preface().await.unwrap(), h2, "{:?}", String::from_utf8_lossy(&all));
            let mut got = Vec::new();
            let mut small = [0u8; 3];
            let n = server.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, all);
            drop(writer.await.unwrap());
        };
        check(vec![b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"], false).await;
        check(vec![H2_PREFACE, b"\0\0\0\x04\0\0\0\0\0"], true).await;
        check(vec![b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\nmore"], true).await;
        check(vec![b"PRI * HT", b"TP/1.1\r\n\r\n"], false).await;
        check(vec![b"PRI"], false).await; // then end of stream
        check(vec![&[b'x'; 5000]], false).await; // longer than one read ahead
        check(vec![], false).await;
    }

    async fn pair() -> (TcpStream, SendfileStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, SendfileStream::new(server))
    }

    /// Bounds a step of a test: a held-back byte that never arrives fails instead of hanging.
    async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(20), fut).await.expect("timed out")
    }

    /// A last response, copied and sent with `sendfile`, then the shutdown: every byte
    /// arrives, then the end of the stream.
    #[tokio::test]
    async fn a_last_response_goes_out_with_the_shutdown() {
        let file = data(SENDFILE_MIN * 3 + 1, 11);
        let packed = pack(&[&file]).unwrap();
        for with_file in [false, true] {
            let (mut client, mut server) = pair().await;
            server.closing().store(true, Ordering::Relaxed);
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec();
            let mut expected = head.clone();
            server.write_all(&head).await.unwrap();
            if with_file {
                let slices = [IoSlice::new(b"head"), IoSlice::new(&packed[0])];
                let n = server.write_vectored(&slices).await.unwrap();
                assert!(n > 4, "the head and some of the file");
                expected.extend_from_slice(b"head");
                expected.extend_from_slice(&file[..n - 4]);
                server.write_all(&packed[0][n - 4..]).await.unwrap();
                expected.extend_from_slice(&file[n - 4..]);
            }
            server.shutdown().await.unwrap();
            let mut got = Vec::new();
            within(client.read_to_end(&mut got)).await.unwrap();
            assert!(got == expected, "with_file {with_file}: {} of {} bytes", got.len(), expected.len());
        }
    }

    /// Polls `fut` once: its output if it is ready at once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(match Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        }))
        .await
    }

    /// Said to be the last, but the connection goes on reading (it was not the last after
    /// all): what was held back goes out before the read waits for the peer.
    #[tokio::test]
    async fn held_bytes_go_out_before_a_read() {
        let file = data(SENDFILE_MIN + 100, 13);
        let packed = pack(&[&file]).unwrap();
        for with_file in [false, true] {
            let (mut client, mut server) = pair().await;
            server.closing().store(true, Ordering::Relaxed);
            let response: &[u8] = if with_file { &packed[0] } else { b"a response the client waits for" };
            server.write_all(response).await.unwrap();
            let fd = server.stream.as_raw_fd();
            let (polled_tx, polled_rx) = tokio::sync::oneshot::channel();
            let reader = tokio::spawn(async move {
                let mut buf = [0u8; 4];
                let mut read = std::pin::pin!(server.read(&mut buf));
                assert!(futures_poll_once(read.as_mut()).await.is_none(), "nothing to read yet");
                polled_tx.send(()).unwrap();
                let n = read.await.unwrap();
                (n, buf)
            });
            polled_rx.await.unwrap();
            // The read is waiting: nothing may be left unsent (the kernel would otherwise send
            // a held tail only when its cork timer fires).
            let mut unsent: libc::c_int = -1;
            // SAFETY: SIOCOUTQNSD writes an int: the bytes queued but not yet sent.
            assert_eq!(unsafe { libc::ioctl(fd, libc::SIOCOUTQNSD, &mut unsent) }, 0);
            assert_eq!(unsent, 0, "bytes held back while waiting for the peer");
            let mut got = vec![0u8; response.len()];
            within(client.read_exact(&mut got)).await.expect("the held bytes arrive while the server reads");
            assert!(got == response);
            client.write_all(b"next").await.unwrap();
            assert_eq!(within(reader).await.unwrap(), (4, *b"next"));
        }
    }

    #[tokio::test]
    async fn plain_buffers_pass_through() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = SendfileStream::new(server);
        let big = data(SENDFILE_MIN * 2, 7); // large, but on the heap: not a region
        server.write_all(b"abc").await.unwrap();
        server.write_all(&big).await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [b"abc".to_vec(), big].concat());
    }
}
