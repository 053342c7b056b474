//! `/fake/exchanges` must match, byte for byte, what a raw client sent and received.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use fake_upstream::{Exchange, FakeConfig, ModelBehaviour, monotonic_ns};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const STREAM_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
const PLAIN_BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

fn config() -> FakeConfig {
    FakeConfig {
        default: ModelBehaviour {
            ttfb_ms: 0,
            chunks: 5,
            chunk_interval_ms: 50,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn request(method: &str, path: &str, request_id: Option<&str>, body: &str) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: fake\r\n");
    if let Some(id) = request_id {
        head += &format!("x-request-id: {id}\r\n");
    }
    if !body.is_empty() {
        head += &format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
    }
    format!("{head}\r\n{body}").into_bytes()
}

/// What one request/response looked like from the client's side of the socket.
struct Seen {
    sent: usize,
    received: Vec<u8>,
    before_send_ns: u64,
    after_response_ns: u64,
}

impl Seen {
    fn body(&self) -> &[u8] {
        let head_end = find(&self.received, b"\r\n\r\n").unwrap() + 4;
        &self.received[head_end..]
    }
}

/// Sends `request` and reads exactly one response (by its framing), keeping the
/// connection open for the next.
fn roundtrip(tcp: &mut TcpStream, request: &[u8]) -> Seen {
    let before_send_ns = monotonic_ns();
    tcp.write_all(request).unwrap();
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    while response_len(&received).is_none() {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed mid-response: {received:?}");
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(response_len(&received), Some(received.len()), "extra bytes");
    Seen {
        sent: request.len(),
        received,
        before_send_ns,
        after_response_ns: monotonic_ns(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the complete response at the start of `bytes`, if it is complete.
fn response_len(bytes: &[u8]) -> Option<usize> {
    let head_end = find(bytes, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..head_end])
        .unwrap()
        .to_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if let Some(len) = header("content-length") {
        let end = head_end + len.parse::<usize>().unwrap();
        return (bytes.len() >= end).then_some(end);
    }
    assert_eq!(header("transfer-encoding"), Some("chunked"), "{head}");
    let mut at = head_end;
    loop {
        let line_end = at + find(&bytes[at..], b"\r\n")?;
        let size = std::str::from_utf8(&bytes[at..line_end]).unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        at = line_end + 2 + size + 2;
        if bytes.len() < at {
            return None;
        }
        if size == 0 {
            return Some(at);
        }
    }
}

fn expected(seen: &Seen, peer: SocketAddr, path: &str, id: Option<&str>, writes: u64) -> Exchange {
    Exchange {
        request_id: id.map(str::to_owned),
        path: path.to_owned(),
        peer_ip: peer.ip(),
        peer_port: peer.port(),
        received_ns: 0,
        first_read_ns: 0,
        first_write_began_ns: 0,
        first_write_ended_ns: 0,
        last_write_began_ns: 0,
        last_write_ended_ns: 0,
        request_bytes: seen.sent as u64,
        response_bytes: seen.received.len() as u64,
        writes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_are_what_crossed_the_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(fake_upstream::serve(listener, config()));
    tokio::task::spawn_blocking(move || client(addr))
        .await
        .unwrap();
    server.abort();
}

fn client(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let peer = tcp.local_addr().unwrap();
    let chat = "/v1/chat/completions";
    let models = roundtrip(&mut tcp, &request("GET", "/v1/models", None, ""));
    let plain = roundtrip(&mut tcp, &request("POST", chat, Some("plain"), PLAIN_BODY));
    let stream = roundtrip(
        &mut tcp,
        &request("POST", chat, Some("stream"), STREAM_BODY),
    );
    let events = stream.body().windows(6).filter(|w| w == b"data: ").count();
    assert_eq!(events, 5 + 2, "5 content chunks, the finish chunk, [DONE]");
    drop(tcp);

    // The ledger lists each listing request too: earlier ones finished, the one being
    // answered with its request bytes but no response yet.
    let mut ledger_tcp = TcpStream::connect(addr).unwrap();
    let ledger_peer = ledger_tcp.local_addr().unwrap();
    let list = request("GET", "/fake/exchanges", Some("ledger"), "");
    let mut listings = Vec::new();
    eventually(|| {
        let listed = roundtrip(&mut ledger_tcp, &list);
        let all: Vec<Exchange> = serde_json::from_slice(listed.body()).unwrap();
        listings.push(listed);
        let (mut own, mut ours): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|e| e.path == "/fake/exchanges");

        let mut own_expected: Vec<Exchange> = (listings.iter())
            .map(|l| expected(l, ledger_peer, "/fake/exchanges", Some("ledger"), 1))
            .collect();
        let answering = own_expected.last_mut().unwrap();
        (answering.response_bytes, answering.writes) = (0, 0);
        check_times(&mut own, &listings.iter().collect::<Vec<_>>())?;
        same(&own, &own_expected)?;

        check_times(&mut ours, &[&models, &plain, &stream])?;
        same(
            ours.as_slice(),
            &[
                expected(&models, peer, "/v1/models", None, 1),
                expected(&plain, peer, chat, Some("plain"), 1),
                // Head + first chunk, one write per paced chunk, and the last chunk
                // together with the finish chunk, [DONE] and the chunked terminator.
                expected(&stream, peer, chat, Some("stream"), 5),
            ],
        )
    });

    // Totals: every byte of every exchange so far, the stats requests' included (but not
    // yet the response being answered).
    let mut stats_tcp = TcpStream::connect(addr).unwrap();
    let stats_request = request("GET", "/fake/stats", None, "");
    let mut stats_seen = Vec::new();
    eventually(|| {
        let seen = roundtrip(&mut stats_tcp, &stats_request);
        let stats: Value = serde_json::from_slice(seen.body()).unwrap();
        stats_seen.push(seen);
        let earlier = [&models, &plain, &stream].into_iter().chain(&listings);
        let (answered, answering) = stats_seen.split_at(stats_seen.len() - 1);
        let read: usize = earlier.clone().chain(&stats_seen).map(|s| s.sent).sum();
        let written: usize = earlier.chain(answered).map(|s| s.received.len()).sum();
        let writes = 1 + 1 + 5 + listings.len() + answered.len();
        let got = ["wire_bytes_read", "wire_bytes_written", "wire_writes"].map(|k| &stats[k]);
        same(&got, &[&json!(read), &json!(written), &json!(writes)])?;
        same(&stats["exchanges_dropped"], &json!(0))?;
        same(&answering[0].sent, &stats_request.len())
    });
}

/// Checks each exchange's times follow each other between its request's sending and its
/// response's arrival — first request byte read, handled, first response write, last
/// response write — and zeroes them for comparing the rest.
fn check_times(exchanges: &mut [Exchange], seen: &[&Seen]) -> Result<(), String> {
    use std::mem::take;
    for (e, seen) in exchanges.iter_mut().zip(seen) {
        let mut steps = vec![
            ("sent", seen.before_send_ns),
            ("first read", take(&mut e.first_read_ns)),
            ("received", take(&mut e.received_ns)),
        ];
        let writes = [
            ("first write began", take(&mut e.first_write_began_ns)),
            ("first write ended", take(&mut e.first_write_ended_ns)),
            ("last write began", take(&mut e.last_write_began_ns)),
            ("last write ended", take(&mut e.last_write_ended_ns)),
        ];
        if e.writes > 0 {
            // A write's end is booked after the syscall returns, maybe after the client
            // has read its bytes: only its beginning is bounded by the response's arrival.
            steps.extend([
                writes[0],
                writes[2],
                ("response read", seen.after_response_ns),
            ]);
            if !(writes[0].1 <= writes[1].1 && writes[2].1 <= writes[3].1) {
                return Err(format!("write times out of order: {writes:?}"));
            }
        } else if writes.iter().any(|(_, ns)| *ns != 0) {
            return Err(format!("write times without writes: {writes:?}"));
        }
        if !steps.windows(2).all(|pair| pair[0].1 <= pair[1].1) {
            return Err(format!("times out of order: {steps:?}"));
        }
    }
    Ok(())
}

fn same<T: PartialEq + std::fmt::Debug + ?Sized>(got: &T, want: &T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("got {got:?}\nwant {want:?}"))
    }
}

/// Asks again until `check` passes, for a second at most: the fake books a write just
/// after the syscall returns, so a client that has read a response can ask too early.
fn eventually(mut check: impl FnMut() -> Result<(), String>) {
    let mut failure = String::new();
    for _ in 0..100 {
        match check() {
            Ok(()) => return,
            Err(err) => failure = err,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{failure}");
}
