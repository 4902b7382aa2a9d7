//! Sessions that go through: the relay, end to end over loopback.

mod common;

use std::time::Duration;

use common::upstream::{self, pattern_vec};
use common::{Behaviour as B, Harness, NS};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::{Bytes, Message};

#[test]
fn echoes_text_and_binary_both_ways() {
    let h = Harness::start(B::Echo);
    let mut ws = h.ws("echo");
    ws.send(Message::text("hello VM")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello VM"));
    let bin: Vec<u8> = (0..=255).collect();
    ws.send(Message::binary(bin.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(bin));
    ws.close(None).unwrap();
    // The close handshake completes through the proxy, and then the proxy
    // closes TCP (the server side closes first).
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    drop(ws);
    assert!(
        h.wait_idle(),
        "proxy still holds sockets after a clean close"
    );
}

#[test]
fn bytes_the_upstream_sends_with_its_101_are_not_lost() {
    // A VNC server speaks first: its greeting can arrive in the same TCP
    // segment as the 101.
    let h = Harness::start(B::Vnc);
    let mut ws = h.ws("vnc");
    assert_eq!(
        ws.read().unwrap(),
        Message::binary(b"RFB 003.008\n".to_vec())
    );
    ws.send(Message::binary(b"RFB 003.008\n".to_vec())).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::binary(b"RFB 003.008\n".to_vec())
    );
}

#[test]
fn upstream_sees_the_filled_in_path_and_host() {
    let h = Harness::start(B::Echo);
    let mut ws = h.ws("echo-path");
    ws.send(Message::text("x")).unwrap();
    ws.read().unwrap();
    let seen = h.upstream.seen();
    let req = seen.last().expect("upstream saw a request");
    assert_eq!(
        req.path,
        format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/echo-path/vnc"
        )
    );
    assert_eq!(
        req.header("host"),
        Some(h.upstream.addr().to_string().as_str())
    );
    assert_eq!(req.header("sec-websocket-version"), Some("13"));
    // A fresh key per session, never the client's.
    assert_ne!(
        req.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

#[test]
fn a_16_mib_message_arrives_intact() {
    let h = Harness::start(B::Echo);
    let mut ws = h.ws("echo-big");
    let big = pattern_vec(7, 16 << 20);
    ws.send(Message::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(got) => assert!(got[..] == big[..], "16 MiB echo differs"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_message_in_1000_fragments_arrives_intact() {
    let h = Harness::start(B::Echo);
    let mut ws = h.ws("echo-frag");
    let mut whole = Vec::new();
    for i in 0..1000u32 {
        let part = pattern_vec(u64::from(i) * 100, 100 + (i as usize % 7));
        whole.extend_from_slice(&part);
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        ws.write(Message::Frame(Frame::message(part, opcode, i == 999)))
            .unwrap();
        if i % 50 == 0 {
            // A ping between fragments is legal and must pass too.
            ws.write(Message::Ping(Bytes::from_static(b"mid"))).unwrap();
        }
    }
    ws.flush().unwrap();
    let mut pongs = 0;
    loop {
        match ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"mid");
                pongs += 1;
            }
            Message::Binary(got) => {
                assert_eq!(got.len(), whole.len());
                assert!(got[..] == whole[..]);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs > 0);
}

#[test]
fn pings_and_pongs_pass_end_to_end() {
    let h = Harness::start(B::Echo);
    let mut ws = h.ws("echo-ping");
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(Bytes::from_static(b"are you there"))
    );
}

#[test]
fn upstream_dropping_tcp_gives_the_client_a_close_frame() {
    let h = Harness::start(B::DropAfter(5000));
    let mut ws = h.ws("dropafter-5000");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 5000)));
    match ws.read() {
        Ok(Message::Close(Some(CloseFrame { code, reason }))) => {
            assert_eq!(code, CloseCode::Away);
            assert!(reason.contains("upstream"), "{reason}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    drop(ws);
    assert!(
        h.wait_idle(),
        "proxy still holds sockets after the upstream dropped"
    );
}

#[test]
fn upstream_closing_normally_is_relayed() {
    let h = Harness::start(B::CloseAfter(100));
    let mut ws = h.ws("closeafter-100");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 100)));
    match ws.read() {
        Ok(Message::Close(Some(CloseFrame { code, reason }))) => {
            assert_eq!(code, CloseCode::Normal);
            assert_eq!(reason.as_str(), "done");
        }
        other => panic!("expected the upstream's close frame, got {other:?}"),
    }
    // tungstenite answers the close; then the proxy closes TCP.
    let _ = ws.flush();
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    drop(ws);
    assert!(h.wait_idle());
}

#[test]
fn client_dropping_tcp_mid_stream_gives_the_upstream_a_close_frame() {
    let h = Harness::start(B::Sink);
    let mut ws = h.ws("sink");
    for i in 0..10u64 {
        ws.send(Message::binary(pattern_vec(i * 1000, 1000)))
            .unwrap();
    }
    // Drop TCP without a close frame.
    ws.get_mut().shutdown(std::net::Shutdown::Both).unwrap();
    drop(ws);
    assert!(upstream::wait_until(Duration::from_secs(10), || !h
        .upstream
        .sink_results()
        .is_empty()));
    let (bytes, sum) = h.upstream.sink_results()[0];
    assert_eq!(bytes, 10_000);
    assert_eq!(
        sum,
        upstream::fnv1a(upstream::FNV_OFFSET, &pattern_vec(0, 10_000))
    );
    assert_eq!(
        h.upstream.close_codes(),
        vec![Some(1001)],
        "the upstream must get a close frame 1001, not a bare FIN"
    );
    assert!(
        h.wait_idle(),
        "proxy still holds sockets after the client dropped"
    );
}

#[test]
fn a_client_that_never_closes_its_socket_is_dropped_after_the_close_timeout() {
    let h = Harness::start_with(B::CloseAfter(10), |c| {
        c.close_timeout = Duration::from_secs(1)
    });
    let mut ws = h.ws("closeafter-10");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 10)));
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
    // The close reply goes out, but the socket stays open: the proxy must
    // not wait for it forever.
    let _ = ws.flush();
    assert!(
        h.wait_idle(),
        "the proxy kept a lingering socket past its close timeout"
    );
    drop(ws);
}

#[test]
fn keepalive_timers_never_strand_a_closing_session() {
    // Regression: a keepalive check that fell due while the closing
    // handshake was still running cleared the session's only deadline, and
    // a peer that never completed the close kept both sockets open forever.
    let h = Harness::start_with(B::CloseAfter(10), |c| {
        c.ping_interval = Duration::from_secs(1);
        c.peer_timeout = Duration::from_secs(3);
        c.close_timeout = Duration::from_secs(3);
    });
    let mut ws = h.ws("closeafter-10");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 10)));
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
    // Never answer the close, never close the socket.
    assert!(h.wait_idle(), "the session outlived its closing timeout");
    drop(ws);
}

#[test]
fn a_thousand_concurrent_sessions() {
    // Each session holds five descriptors in this process: the client's socket, the proxy's
    // two (client side, upstream side), and the stand-in's socket with the clone it keeps.
    let n = common::fit_to_nofile_limit("a_thousand_concurrent_sessions", 1000, 5);
    let h = Harness::start(B::Echo);
    let token = Harness::token(&["echo-many"]);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(h.ws_path(&format!("/{token}/echo-many")));
    }
    assert_eq!(h.handle().stats().open_sessions, n);
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send(Message::text(format!("session {i}"))).unwrap();
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        assert_eq!(ws.read().unwrap(), Message::text(format!("session {i}")));
    }
    for mut ws in sockets {
        ws.close(None).unwrap();
        let _ = ws.flush();
    }
    assert!(h.wait_idle(), "sessions left: {:?}", h.handle().stats());
}

#[test]
fn a_last_frame_arriving_with_the_fin_is_relayed_and_ends_the_session() {
    // The proxy skips the read that would only say "nothing more" after a
    // short read, unless the event said the peer's FIN is queued too. Data
    // and FIN arriving in one event must still end the session at once:
    // the frame reaches the upstream, then a close 1001, and nothing hangs.
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let h = Harness::start_with(B::Sink, |c| c.close_timeout = Duration::from_secs(30));
    const SESSIONS: usize = 20;
    let payload = pattern_vec(0, 1000);
    for _ in 0..SESSIONS {
        // The 101 head read (nothing follows it from a sink).
        let mut s = common::upgraded(h.addr, &format!("/{}/sink", Harness::token(&["sink"])));
        // One masked binary frame and the FIN, back to back.
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![
            0x82,
            0x80 | 126,
            (1000u16 >> 8) as u8,
            (1000u16 & 0xff) as u8,
        ];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        // The proxy answers the vanished client's side by closing TCP.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the proxy must close the connection");
    }
    assert!(
        upstream::wait_until(Duration::from_secs(10), || h.upstream.sink_results().len()
            == SESSIONS),
        "not every session reached its end at the upstream"
    );
    let sum = upstream::fnv1a(upstream::FNV_OFFSET, &payload);
    for (bytes, got) in h.upstream.sink_results() {
        assert_eq!((bytes, got), (1000, sum));
    }
    assert_eq!(h.upstream.close_codes(), vec![Some(1001); SESSIONS]);
    // Well within the 30 s close timeout: no session waited for an event
    // that had already come.
    assert!(
        h.wait_idle(),
        "a session missed the FIN that came with its last frame"
    );
}

/// A proxy in front of a raw upstream: `upstream` runs on its own thread with the accepted
/// connection and the request head the proxy sent, and what it returns comes out of
/// [`upstream_result`]; the client returned has sent its upgrade for `vm-1` (nothing read
/// yet). The caller shuts the proxy down.
fn through_a_raw_upstream<T: Send + 'static>(
    upstream: impl FnOnce(std::net::TcpStream, String) -> T + Send + 'static,
) -> (
    kubevirt_vnc_proxy::Running,
    std::net::TcpStream,
    std::sync::mpsc::Receiver<T>,
) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = common::read_head(&mut s);
        let _ = done.send(upstream(s, head));
    });
    let config = kubevirt_vnc_proxy::Config::local_dev(
        &format!("ws://{upstream_addr}"),
        common::SECRET.as_bytes(),
    )
    .unwrap();
    let proxy = kubevirt_vnc_proxy::Proxy::bind(config)
        .unwrap()
        .spawn()
        .unwrap();
    let mut s = std::net::TcpStream::connect(proxy.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let path = format!("/{}/vm-1", Harness::token(&["vm-1"]));
    s.write_all(&common::upgrade_request(&path, "")).unwrap();
    (proxy, s, result)
}

/// What the raw upstream's thread returned: a proxy that never dials (or an upstream thread
/// that panicked) fails the test rather than hanging it.
fn upstream_result<T>(result: &std::sync::mpsc::Receiver<T>) -> T {
    result
        .recv_timeout(Duration::from_secs(15))
        .expect("the raw upstream did not finish (never dialed, or it panicked)")
}

#[test]
fn the_upgrade_request_carries_the_last_ack_of_the_upstream_handshake() {
    // The upstream socket is made with TCP_QUICKACK off: the proxy's side of the three-way
    // handshake does not send its last ACK on its own but with the upgrade request, the first
    // bytes it sends. So when the request is in, the upstream's socket has received two
    // segments (the SYN and the request), not three (SYN, ACK, request). (Were the proxy's
    // thread kept from writing for 200 ms after the SYN-ACK, the ACK would go alone.)
    let seen = common::segments_within_three_tries(2, || {
        let (proxy, _client, upstream) = through_a_raw_upstream(|s, head| {
            assert!(head.starts_with("GET "), "{head}");
            common::segments_in(&s)
        });
        let segments = upstream_result(&upstream);
        proxy.shutdown().unwrap();
        segments
    });
    assert_eq!(
        seen,
        Ok(()),
        "the upstream received these segments up to the end of the request, in each try"
    );
}

#[test]
fn the_close_answer_and_the_fin_reach_the_client_in_one_segment() {
    // After the close handshake the proxy closes the client's socket at once, so it writes the
    // upstream's close answer with MSG_MORE and the FIN leaves in the same segment: one segment
    // and one ACK per session fewer. A raw upstream answers the client's close a second late,
    // by which time the proxy's ACK of that close (delayed at most 200 ms) is in; from then on
    // the client must receive exactly one segment: the close frame carrying the FIN.
    let seen = common::segments_within_three_tries(1, the_close_answer_and_the_fin_in_segments);
    assert_eq!(
        seen,
        Ok(()),
        "the close answer and the FIN came in these segments, in each try"
    );
}

/// One try of the test above: the segments the client received from its close on.
fn the_close_answer_and_the_fin_in_segments() -> u32 {
    use std::io::{Read, Write};
    let (proxy, mut s, upstream) = through_a_raw_upstream(|mut s, head| {
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key");
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        write!(
            s,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .unwrap();
        // The client's close 1000, masked: 2 header bytes, 4 of mask, 2 of code.
        let mut close = [0u8; 8];
        s.read_exact(&mut close).unwrap();
        assert_eq!(close[..2], [0x88, 0x82]);
        std::thread::sleep(Duration::from_secs(1));
        s.write_all(&[0x88, 0x02, 0x03, 0xe8]).unwrap();
        // Dropped: the server's FIN.
    });
    let head = common::read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mask = [7u8, 1, 8, 2];
    s.write_all(&[0x88, 0x82, 7, 1, 8, 2, 0x03 ^ mask[0], 0xe8 ^ mask[1]])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let before = common::segments_in(&s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let after = common::segments_in(&s);
    assert_eq!(rest, [0x88, 0x02, 0x03, 0xe8]);
    upstream_result(&upstream);
    proxy.shutdown().unwrap();
    after - before
}
