//! The UDP echo service.

mod common;

use common::*;
use tokio::net::UdpSocket;
use web_app::UdpEcho;

#[tokio::test]
async fn udp_echo_answers_with_the_node_name() {
    let node = start(|config, _| config.udp_echo = Some("127.0.0.1:0".parse().unwrap())).await;
    let echo = node.udp.expect("UDP echo address");
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 70_000];
    for payload in [&b"ping"[..], b"", b"\x00\xffbinary\r\n", &[7u8; 1400]] {
        client.send_to(payload, echo).await.unwrap();
        let (len, from) = within(client.recv_from(&mut buf)).await.unwrap();
        assert_eq!(from, echo);
        let mut expected = format!("{NODE} ").into_bytes();
        expected.extend_from_slice(payload);
        assert_eq!(&buf[..len], &expected[..]);
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn udp_echo_alone_replies_to_each_sender() {
    let echo = UdpEcho::bind("127.0.0.1:0".parse().unwrap(), "web2").await.unwrap();
    let addr = echo.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(echo.run(async move {
        let _ = stop_rx.await;
    }));

    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a.send_to(b"from a", addr).await.unwrap();
    b.send_to(b"from b", addr).await.unwrap();
    let mut buf = [0u8; 64];
    let (len, _) = within(a.recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"web2 from a");
    let (len, _) = within(b.recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"web2 from b");

    stop_tx.send(()).unwrap();
    within(task).await.unwrap().unwrap();
}
