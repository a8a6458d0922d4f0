//! The real `leasehold serve` binary as a child process: the one way tests
//! start, signal, kill and restart a server process (tests that need a
//! server they can crash, freeze or talk to from other languages and
//! tools). In-process servers are [`super::TestServer`].
//!
//! Ready means the server logged `store reachable: SERVING` after its
//! `listening addr=...` line ([`Ready::Serving`]), or only the latter for a
//! server whose store is meant to be down ([`Ready::Listening`]): real
//! signals, never a sleep.

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use super::{Output, spawn_tied, wait_until};

/// What a started server must have logged before `start` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `listening` and then `store reachable: SERVING`.
    Serving,
    /// Only `listening` (the store may be down on purpose).
    Listening,
}

/// How to start a server process; [`Launch::default`] is what most tests
/// want.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Always a 127.0.0.1 address in tests.
    pub listen: String,
    /// `LEASEHOLD_LOG`. The default turns on the service's debug lines
    /// (tests wait on "waiting for the holder"); they never carry a token.
    pub log: String,
    /// `--log-format`.
    pub format: &'static str,
    pub ready: Ready,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            log: "info,leasehold::service=debug".into(),
            format: "text",
            ready: Ready::Serving,
        }
    }
}

/// A running `leasehold serve`, SIGKILLed on drop if still running.
pub struct ServerProcess {
    child: Option<Child>,
    pub output: Output,
    /// `127.0.0.1:PORT` as the server logged it.
    pub addr: String,
    args: Vec<String>,
    launch: Launch,
}

impl ServerProcess {
    /// `leasehold serve --listen 127.0.0.1:0 ARGS...`, once SERVING.
    #[track_caller]
    pub fn start(args: &[&str]) -> Self {
        Self::launch(Launch::default(), args)
    }

    /// Like [`Self::start`], but returns once it listens: for a server whose
    /// store is unreachable on purpose.
    #[track_caller]
    pub fn start_unready(args: &[&str]) -> Self {
        let launch = Launch {
            ready: Ready::Listening,
            ..Launch::default()
        };
        Self::launch(launch, args)
    }

    /// `leasehold serve --listen LISTEN ARGS...`, once SERVING.
    #[track_caller]
    pub fn start_on(listen: &str, args: &[&str]) -> Self {
        let launch = Launch {
            listen: listen.into(),
            ..Launch::default()
        };
        Self::launch(launch, args)
    }

    /// A server on Redis (`url`, `prefix`) with a short health interval.
    #[track_caller]
    pub fn on_redis(url: &str, prefix: &str) -> Self {
        Self::start(&super::on_redis_args(url, prefix))
    }

    /// Starts a server as `launch` says. `LEASEHOLD_TEST_BINARY` replays a
    /// test on another build (an older release, to show that a regression
    /// test fails there).
    #[track_caller]
    pub fn launch(launch: Launch, args: &[&str]) -> Self {
        assert!(
            launch.listen.starts_with("127.0.0.1:"),
            "tests listen on loopback"
        );
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let program = std::env::var_os("LEASEHOLD_TEST_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_leasehold").into());
        let mut cmd = Command::new(program);
        cmd.env("LEASEHOLD_LOG", &launch.log)
            .env_remove("RUST_LOG")
            .env_remove("LEASEHOLD_LISTEN")
            .env_remove("LEASEHOLD_REDIS_URL")
            .args(["--log-format", launch.format, "serve", "--listen"])
            .arg(&launch.listen)
            .args(&args);
        let mut child = spawn_tied(cmd);
        let output = Output::capture(&mut child);
        let line = output.wait_for("listening", Duration::from_secs(20));
        let addr = addr_in(&line).unwrap_or_else(|| panic!("no addr in {line:?}"));
        if launch.ready == Ready::Serving {
            output.wait_for("store reachable: SERVING", Duration::from_secs(20));
        }
        Self {
            child: Some(child),
            output,
            addr,
            args,
            launch,
        }
    }

    /// `http://127.0.0.1:PORT`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (`TERM`, `-KILL`, `STOP`, `CONT`...).
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    /// Waits for the process to exit, at most `within`.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child, within)
    }

    /// SIGKILL: a crash, nothing released.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same address with the same flags.
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill();
        let launch = Launch {
            listen: self.addr.clone(),
            ..self.launch.clone()
        };
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let again = Self::launch(launch, &args);
        assert_eq!(again.addr, self.addr);
        *self = again;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address in a `listening` line, text (`addr=...`) or JSON
/// (`"addr":"..."`).
fn addr_in(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .map(|a| a.trim_matches('"').to_string())
        .or_else(|| {
            line.split("\"addr\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_string)
        })
}

/// `kill -SIG pid`; `sig` with or without its dash.
#[track_caller]
pub fn signal(pid: u32, sig: &str) {
    let sig = sig.trim_start_matches('-');
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
