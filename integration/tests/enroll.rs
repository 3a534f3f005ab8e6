//! Hostile input on the ztunnel's enrollment socket: every bad request gets
//! an error reply naming the problem, the socket keeps serving, nothing
//! panics and memory stays flat. No root needed.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use weft_cli::demo::mesh::ZtunnelOptions;
use weft_integration::{Mesh, rss_kib};
use weft_ztunnel::enroll::{Reply, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_socket_keeps_serving() {
    let mesh = Mesh::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = "workloads: [{name: web, node: n, addresses: [10.0.0.2]}]";
    let zt = mesh
        .ztunnel("n", yaml, dir.path(), ZtunnelOptions::default())
        .await;
    let socket = zt.enroll_socket.clone();

    let cases = [
        ("not json", "bad request"),
        (r#"{"op":"explode"}"#, "unknown variant"),
        (
            r#"{"op":"add","uid":"u","namespace":"default","name":"web","netns":"/x","extra":1}"#,
            "unknown field",
        ),
        (
            r#"{"op":"add","uid":"u","namespace":"default"}"#,
            "missing field",
        ),
        (
            r#"{"op":"add","uid":"u","namespace":"default","name":"ghost","netns":"/x"}"#,
            "no workload default/ghost",
        ),
        (
            r#"{"op":"add","uid":"u","namespace":"default","name":"web","netns":"/nonexistent/netns"}"#,
            "/nonexistent/netns",
        ),
        (r#"{"op":"check","uid":"nobody"}"#, "not enrolled"),
    ];
    // One connection, many requests: each answered, the connection stays up.
    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    for (input, want) in cases {
        write
            .write_all(format!("{input}\n").as_bytes())
            .await
            .expect("write");
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("bounded")
            .expect("read")
            .expect("a reply");
        let reply: Reply = serde_json::from_str(&line).expect("reply is JSON");
        assert!(!reply.ok, "{input} was accepted");
        let error = reply.error.unwrap_or_default();
        assert!(error.contains(want), "{input}: {error}");
    }
    // Removing what is not there is fine (idempotent, like CNI DEL).
    assert!(
        request(&socket, r#"{"op":"remove","uid":"nobody"}"#)
            .await
            .expect("reply")
            .ok
    );

    // An endless line is cut off at 64 KiB with an error, not buffered.
    // (The server closes with our excess bytes unread, so only its reply
    // line is readable; after it the connection resets.)
    let mut s = UnixStream::connect(&socket).await.expect("connect");
    let _ = s.write_all(&vec![b'x'; 200 * 1024]).await;
    let mut reply = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(&mut s).read_line(&mut reply),
    )
    .await
    .expect("answered");
    assert!(reply.contains("over 64 KiB"), "{reply}");

    // Many hostile connections leave memory flat.
    let before = rss_kib();
    for _ in 0..500 {
        let mut s = UnixStream::connect(&socket).await.expect("connect");
        let _ = s.write_all(&[0xffu8; 8192]).await;
        let _ = s.write_all(b"\n").await;
        let mut sink = Vec::new();
        let _ = s.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 20 * 1024,
        "RSS grew by {grown} KiB over 500 hostile connections"
    );
    assert!(
        request(&socket, r#"{"op":"check","uid":"x"}"#)
            .await
            .is_ok(),
        "socket still serving"
    );
}
