//! The real `leasehold serve` binary as a child process, for tests that talk
//! to it from other languages and tools (Python, grpcurl). Included with
//! `#[path = "common/binary.rs"] mod binary;` next to `mod common;`.
//!
//! Ready means the server logged `store reachable: SERVING`, after its
//! `listening addr=...` line: a real signal, not a sleep.

#![allow(dead_code)]

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::common::{Output, spawn_tied, wait_until};

/// A running `leasehold serve`, SIGKILLed on drop if still running.
pub struct Binary {
    pub child: Child,
    pub output: Output,
    /// `127.0.0.1:PORT` as the server logged it.
    pub addr: String,
}

impl Binary {
    /// `leasehold serve --listen 127.0.0.1:0 ARGS...`, once SERVING.
    #[track_caller]
    pub fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args)
    }

    /// `leasehold serve --listen LISTEN ARGS...`, once SERVING. `listen`
    /// is always a 127.0.0.1 address in tests.
    #[track_caller]
    pub fn start_on(listen: &str, args: &[&str]) -> Self {
        assert!(listen.starts_with("127.0.0.1:"), "tests listen on loopback");
        // LEASEHOLD_TEST_BINARY replays a test on another build (an older
        // release, to show that a regression test fails there).
        let program = std::env::var_os("LEASEHOLD_TEST_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_leasehold").into());
        let mut cmd = Command::new(program);
        // Debug lines of the service say when a call waits, for tests to
        // wait on; they never carry a token.
        cmd.env("LEASEHOLD_LOG", "info,leasehold::service=debug")
            .env_remove("LEASEHOLD_LISTEN")
            .env_remove("LEASEHOLD_REDIS_URL")
            .args(["serve", "--listen", listen, "--log-format", "text"])
            .args(args);
        let mut child = spawn_tied(cmd);
        let output = Output::capture(&mut child);
        let line = output.wait_for("listening", Duration::from_secs(20));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"))
            .to_string();
        output.wait_for("store reachable: SERVING", Duration::from_secs(20));
        Self {
            child,
            output,
            addr,
        }
    }

    /// `http://127.0.0.1:PORT`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Waits for the process to exit, at most `within`.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        wait_exit(&mut self.child, within)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -SIG pid`.
#[track_caller]
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Waits for `child` to exit, at most `within`.
#[track_caller]
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let mut status = None;
    wait_until("the process to exit", within, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}
