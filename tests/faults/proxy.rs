//! A TCP proxy on 127.0.0.1, for network faults between a client and a
//! Leasehold server or between a server and Redis: `Cut` closes every
//! connection and refuses new ones (a dead host), `Pause` stops moving bytes
//! but keeps the connections (a partition: what was sent arrives once it
//! heals), `Pass` forwards again, and a delay per direction holds every
//! chunk that long before passing it on, in order. The fault scenarios and
//! the client-belief tests share it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Pause,
}

/// The proxy's settings: the mode, and the delay of each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// Client to server.
    pub up: Duration,
    /// Server to client.
    pub down: Duration,
}

/// A running proxy; stops (closing every connection) on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    settings: watch::Sender<Settings>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:(free port) to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (settings, rx) = watch::channel(Settings {
            mode: Mode::Pass,
            up: Duration::ZERO,
            down: Duration::ZERO,
        });
        let task = tokio::spawn(accept(listener, upstream, rx));
        Self {
            addr,
            settings,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.settings.send_modify(|s| s.mode = mode);
    }

    /// Delays each direction from now on (chunks already held keep theirs).
    pub fn delay(&self, up: Duration, down: Duration) {
        self.settings.send_modify(|s| {
            s.up = up;
            s.down = down;
        });
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy as a Redis URL (for a server that reaches Redis through it).
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    mut settings: watch::Receiver<Settings>,
) {
    let addr = listener.local_addr().expect("proxy addr");
    let mut listener = Some(listener);
    // Dropped with the accept task: every connection goes with it.
    let mut conns = JoinSet::new();
    loop {
        let cut = settings.borrow_and_update().mode == Mode::Cut;
        if cut {
            listener = None;
            conns.abort_all();
        } else if listener.is_none() {
            listener = TcpListener::bind(addr).await.ok();
        }
        let Some(l) = listener.as_ref() else {
            if settings.changed().await.is_err() {
                return;
            }
            continue;
        };
        let client = tokio::select! {
            accepted = l.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let settings = settings.clone();
        conns.spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // Either direction ending ends both.
            tokio::select! {
                _ = pump(cr, sw, settings.clone(), true) => {}
                _ = pump(sr, cw, settings, false) => {}
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Waits while paused; false once cut (or the proxy is gone).
async fn flowing(settings: &mut watch::Receiver<Settings>) -> bool {
    loop {
        match settings.borrow_and_update().mode {
            Mode::Pass => return true,
            Mode::Cut => return false,
            Mode::Pause => {}
        }
        if settings.changed().await.is_err() {
            return false;
        }
    }
}

/// Reads chunks and hands them, stamped with when they may go, to a writer
/// that holds each until then. The end of the stream (EOF) is delayed like
/// the bytes before it: it reaches the other side after them.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    mut settings: watch::Receiver<Settings>,
    up: bool,
) {
    // An empty chunk stands for EOF.
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = write_out(to, rx, settings.clone());
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !flowing(&mut settings).await {
                return false;
            }
            let n = tokio::select! {
                n = from.read(&mut buf) => n,
                // Re-check the mode (a read is cancel-safe: nothing is lost).
                _ = settings.changed() => continue,
            };
            let s = *settings.borrow();
            let at = Instant::now() + if up { s.up } else { s.down };
            let n = match n {
                Ok(0) | Err(_) => {
                    let _ = tx.send((at, Vec::new()));
                    return true;
                }
                Ok(n) => n,
            };
            if tx.send((at, buf[..n].to_vec())).is_err() {
                return false;
            }
        }
    };
    tokio::pin!(writer);
    tokio::select! {
        ended = reader => {
            if ended {
                // Let the writer deliver what it holds, then the EOF.
                writer.await;
            }
        }
        _ = &mut writer => {}
    }
}

async fn write_out(
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut settings: watch::Receiver<Settings>,
) {
    while let Some((at, bytes)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        // Bytes read just before a pause are held until it ends.
        if !flowing(&mut settings).await {
            return;
        }
        if bytes.is_empty() {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
}
