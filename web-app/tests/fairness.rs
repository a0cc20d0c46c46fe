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
    // A run judges only if most of the burst was still unanswered when the other request
    // was sent (the test's task may lose its CPU between the two writes on a busy machine):
    // otherwise it is run again with new connections.
    let mut judged = false;
    for _ in 0..5 {
        if let Some(result) = within(burst_and_one_more(node.addr)).await {
            let (before, after_sent, remaining) = result;
            // In turn: a few answers of the burst at most between the other request's
            // arrival and its answer (it waits for the node to see it, a turn of the event
            // loop; 1 here). Without a turn after each answer: as many as tokio's budget for
            // one poll of a task allows (53 here), or all of them.
            assert!(
                after_sent <= 8,
                "the other connection was answered after {after_sent} of the {remaining} pipelined requests \
                 still unanswered when it was sent ({before} answered before)"
            );
            println!("answered after {after_sent} of {remaining} pipelined requests left when it was sent");
            judged = true;
            break;
        }
    }
    assert!(judged, "in 5 runs the node answered most of the burst before the other request was sent");
    node.stop().await.unwrap();
}

const PIPELINED: usize = 2000;

/// Sends `PIPELINED` requests on one connection, then one on another, and reads all answers.
/// Returns how many of the burst were logged when the other request had been sent, how many
/// after that and before its answer, and how many were left at that point; `None` if fewer
/// than half were left (the run cannot tell turns from no turns).
async fn burst_and_one_more(addr: SocketAddr) -> Option<(usize, usize, usize)> {
    let mut other = TcpStream::connect(addr).await.unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let (other_peer, busy_peer) = (other.local_addr().unwrap().to_string(), busy.local_addr().unwrap().to_string());
    let logged = |answered: &[String]| answered.iter().filter(|p| **p == busy_peer).count();
    // Served from memory by the quick path, answered with a head alone.
    let burst = b"HEAD /index.html HTTP/1.1\r\nhost: t\r\n\r\n".repeat(PIPELINED);
    let (mut busy_read, mut busy_write) = busy.split();
    let reader = read_heads(&mut busy_read, PIPELINED);
    let writer = async {
        busy_write.write_all(&burst).await.unwrap();
        // The node is busy with the burst (thousands of answers) when this arrives.
        other.write_all(b"HEAD /index.html HTTP/1.1\r\nhost: t\r\n\r\n").await.unwrap();
        // Counted once the request is on its way: answers the node gave while this task
        // waited for its CPU between the two would otherwise count against the node.
        let before = logged(&ANSWERED.lock().unwrap());
        read_heads(&mut other, 1).await;
        before
    };
    let ((), before) = tokio::join!(reader, writer);

    // An answer is logged once it is written, so the last lines may come just after the
    // client read the answers: wait for them (bounded).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let answered = ANSWERED.lock().unwrap().clone();
        if logged(&answered) >= PIPELINED && answered.contains(&other_peer) {
            break;
        }
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
    let busy_before = logged(&answered[..other_at]);
    let remaining = PIPELINED - before;
    (remaining >= PIPELINED / 2).then(|| (before, busy_before.saturating_sub(before), remaining))
}
