//! One connection cannot hold an HTTP thread: a client whose next request is always there
//! (pipelined here; in the field, a client on another CPU that answers at once) is answered
//! in turn with the thread's other connections, not all its requests first.
//!
//! The order in which the node answered is read from its access log, captured by a
//! subscriber of this test binary (a file of its own: the subscriber is process-wide).

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The `peer` field of every access log line, in the order the node logged them.
static ANSWERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct AccessPeers;

impl<S: tracing::Subscriber> Layer<S> for AccessPeers {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "access" {
            return;
        }
        struct Peer(Option<String>);
        impl Visit for Peer {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "peer" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut peer = Peer(None);
        event.record(&mut peer);
        if let Some(peer) = peer.0 {
            ANSWERED.lock().unwrap().push(peer);
        }
    }
}

/// Reads from `stream` until `count` response heads without bodies (answers to HEAD) came.
async fn read_heads(stream: &mut (impl AsyncRead + Unpin), count: usize) {
    let (mut seen, mut bytes) = (0, Vec::new());
    let mut buf = vec![0; 64 * 1024];
    while seen < count {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed after {seen} of {count} answers");
        bytes.extend_from_slice(&buf[..n]);
        while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(bytes.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&bytes[..end]));
            bytes.drain(..end + 4);
            seen += 1;
        }
    }
}

#[tokio::test]
async fn a_client_with_requests_always_waiting_does_not_hold_the_thread() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(AccessPeers)).unwrap();
    // One HTTP thread: both connections are served by the same one.
    let node = start_release(&[], |c| c.threads = 1).await;
    const PIPELINED: usize = 2000;
    within(async {
        let mut other = TcpStream::connect(node.addr).await.unwrap();
        let mut busy = TcpStream::connect(node.addr).await.unwrap();
        let (other_peer, busy_peer): (SocketAddr, SocketAddr) = (other.local_addr().unwrap(), busy.local_addr().unwrap());
        // Served from memory by the quick path, answered with a head alone.
        let burst = b"HEAD /index.html HTTP/1.1\r\nhost: t\r\n\r\n".repeat(PIPELINED);
        let (mut busy_read, mut busy_write) = busy.split();
        let reader = read_heads(&mut busy_read, PIPELINED);
        let writer = async {
            busy_write.write_all(&burst).await.unwrap();
            // The node is busy with the burst (thousands of answers) when this arrives.
            other.write_all(b"HEAD /index.html HTTP/1.1\r\nhost: t\r\n\r\n").await.unwrap();
            read_heads(&mut other, 1).await;
        };
        tokio::join!(reader, writer);

        // An answer is logged once it is written, so the last lines may come just after the
        // client read the answers: wait for them (bounded by `within`).
        let (other_peer, busy_peer) = (other_peer.to_string(), busy_peer.to_string());
        let logged = |answered: &[String]| answered.iter().filter(|p| **p == busy_peer).count();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while logged(&ANSWERED.lock().unwrap()) < PIPELINED || !ANSWERED.lock().unwrap().contains(&other_peer) {
            let answered = ANSWERED.lock().unwrap().clone();
            assert!(
                tokio::time::Instant::now() < deadline,
                "5 s after the answers, {} of {PIPELINED} pipelined requests logged, the other one {}",
                logged(&answered),
                if answered.contains(&other_peer) { "too" } else { "not" }
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let answered = ANSWERED.lock().unwrap().clone();
        assert_eq!(logged(&answered), PIPELINED, "every pipelined request is logged once");
        let other_at = answered.iter().position(|p| *p == other_peer).unwrap();
        let busy_before = answered[..other_at].iter().filter(|p| **p == busy_peer).count();
        // In turn: a few answers of the burst at most before the other connection's (it waits
        // for the node to see it, a turn of the event loop). Without turns: all of them.
        assert!(
            busy_before < PIPELINED / 2,
            "the other connection was answered only after {busy_before} of the {PIPELINED} pipelined requests"
        );
        println!("answered after {busy_before} of {PIPELINED} pipelined requests");
    })
    .await;
    node.stop().await.unwrap();
}
