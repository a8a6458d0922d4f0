//! A hostile HTTP/2 client written frame by frame: it opens streams without
//! waiting for the server's MAX_CONCURRENT_STREAMS (which the `h2` crate
//! would honour), never acknowledges SETTINGS, never answers PING, and
//! counts how the server answered each stream.

use std::collections::HashSet;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// RST_STREAM code REFUSED_STREAM.
const REFUSED: u32 = 0x7;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small frame");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal, not Huffman-coded (all ours are < 127 bytes).
fn literal(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).expect("short literal"));
    out.extend_from_slice(s.as_bytes());
}

/// The request headers of a gRPC call to `path`, HPACK-encoded without
/// the dynamic table.
fn grpc_headers(path: &str) -> Vec<u8> {
    let mut h = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    h.push(0x04); // :path, literal without indexing, name index 4
    literal(&mut h, path);
    h.push(0x01); // :authority, name index 1
    literal(&mut h, "localhost");
    h.extend_from_slice(&[0x0f, 0x10]); // content-type, name index 31
    literal(&mut h, "application/grpc");
    h.push(0x00); // te: trailers, new name
    literal(&mut h, "te");
    literal(&mut h, "trailers");
    h
}

/// What the server did with the streams of one connection.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Streams opened by the client.
    pub sent: usize,
    /// Streams the server answered with response headers (accepted).
    pub accepted: usize,
    /// Streams the server answered with headers that end the stream: a
    /// gRPC error in a trailers-only response (the call was refused).
    pub ended: usize,
    /// Streams reset with REFUSED_STREAM.
    pub refused: usize,
    /// Streams reset with another code.
    pub reset_other: usize,
    /// The server sent GOAWAY (with this error code).
    pub goaway: Option<u32>,
    /// The server closed the connection.
    pub closed: bool,
}

/// Opens `streams` gRPC calls to `path` (each a request of one empty
/// message) on one connection to `addr`, as fast as it can write, and
/// reads the server's answers until every stream is accounted for, the
/// connection ends, or `within` passes. Returns the still-open connection
/// too, so that the accepted streams stay open while the caller measures.
pub async fn flood(
    addr: &str,
    path: &str,
    streams: usize,
    within: Duration,
) -> (Outcome, TcpStream) {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    socket.write_all(&out).await.expect("preface");
    let headers = grpc_headers(path);
    let (mut reader, mut writer) = socket.into_split();
    let writing = tokio::spawn(async move {
        let mut sent = 0;
        let mut batch = Vec::with_capacity(64 * 1024);
        for i in 0..streams {
            let id = u32::try_from(2 * i + 1).expect("stream id");
            frame(&mut batch, HEADERS, END_HEADERS, id, &headers);
            frame(&mut batch, DATA, END_STREAM, id, &[0, 0, 0, 0, 0]);
            if batch.len() > 60 * 1024 || i + 1 == streams {
                if writer.write_all(&batch).await.is_err() {
                    break;
                }
                batch.clear();
            }
            sent += 1;
        }
        (sent, writer)
    });
    let mut outcome = Outcome::default();
    let mut answered: HashSet<u32> = HashSet::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut header = [0u8; 9];
    loop {
        if answered.len() >= streams {
            break;
        }
        let read = tokio::time::timeout_at(deadline, reader.read_exact(&mut header)).await;
        match read {
            Err(_) => break,
            Ok(Err(_)) => {
                outcome.closed = true;
                break;
            }
            Ok(Ok(_)) => {}
        }
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let kind = header[3];
        let flags = header[4];
        let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        match tokio::time::timeout_at(deadline, reader.read_exact(&mut payload)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                outcome.closed = true;
                break;
            }
            Err(_) => break,
        }
        match kind {
            HEADERS if id != 0 && answered.insert(id) => {
                if flags & END_STREAM != 0 {
                    outcome.ended += 1;
                } else {
                    outcome.accepted += 1;
                }
            }
            RST_STREAM if payload.len() == 4 && answered.insert(id) => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code == REFUSED {
                    outcome.refused += 1;
                } else {
                    outcome.reset_other += 1;
                }
            }
            GOAWAY if payload.len() >= 8 => {
                outcome.goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                // The server ends the connection: read on until it closes,
                // counting the answers to the streams it had accepted.
            }
            _ => {}
        }
    }
    let (sent, writer) = match tokio::time::timeout(Duration::from_secs(5), writing).await {
        Ok(Ok(done)) => done,
        _ => panic!("the writer did not finish"),
    };
    outcome.sent = sent;
    let socket = reader.reunite(writer).expect("same socket");
    (outcome, socket)
}
