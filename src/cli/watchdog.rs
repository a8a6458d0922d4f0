//! The command's watchdog, for `leasehold lock` and `leasehold elect`.
//!
//! CMD runs in a process group of its own, so that signals reach all of
//! it. A SIGKILLed `leasehold` runs no handler: its KeepAlive stream ends,
//! the server gives the lock to the next holder, and CMD would go on
//! running beside it. So a small helper process (this binary, hidden
//! `watchdog` subcommand) holds the read end of a pipe whose write end
//! only `leasehold` holds. When `leasehold` dies, however it dies, the
//! kernel closes that end; the helper reads end-of-file and SIGKILLs CMD's
//! group at once. Once CMD is gone, `leasehold` disarms it by writing one
//! byte. (Not PR_SET_PDEATHSIG: it needs `pre_exec`, which is unsafe, and
//! reaches CMD alone, not the processes CMD started.)
//!
//! The helper sits in a process group of its own too, so that a Ctrl-C in
//! the terminal, or a signal to `leasehold`'s group, does not take it away.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use clap::Args;
use rustix::process::{Pid, Signal};

/// What the helper reads to stand down: CMD is gone.
const DISARM: u8 = b'q';

/// Flags of the hidden `watchdog` subcommand.
#[derive(Debug, Clone, Args)]
pub struct WatchdogArgs {
    /// The process group to SIGKILL if standard input ends without the
    /// stand-down byte.
    #[arg(long)]
    pub group: i32,
}

/// The running helper, armed until [`Watchdog::disarm`].
#[derive(Debug)]
pub struct Watchdog {
    pipe: std::fs::File,
}

impl Watchdog {
    /// Starts the helper for CMD's process group. `None` (with a warning)
    /// if it cannot start: CMD then runs unguarded, as it did before.
    pub fn start(verb: &str, group: Pid) -> Option<Self> {
        let started = (|| -> std::io::Result<Self> {
            // Close-on-exec: only the helper gets the read end (as its
            // stdin), and nothing but this process holds the write end.
            let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            let mut helper = std::process::Command::new(std::env::current_exe()?);
            helper
                .args(["watchdog", "--group", &group.as_raw_nonzero().to_string()])
                .stdin(Stdio::from(reader))
                .stdout(Stdio::null())
                .process_group(0);
            // The helper is not waited for: it exits by itself when
            // disarmed, or once it has killed the group.
            drop(helper.spawn()?);
            Ok(Self {
                pipe: std::fs::File::from(writer),
            })
        })();
        match started {
            Ok(watchdog) => Some(watchdog),
            Err(e) => {
                eprintln!(
                    "leasehold {verb}: warning: no watchdog for the command ({e}): if this process is killed outright, the command goes on running"
                );
                None
            }
        }
    }

    /// CMD is gone: the helper exits without killing anything.
    pub fn disarm(mut self) {
        let _ = self.pipe.write_all(&[DISARM]);
    }
}

/// The helper: waits for the stand-down byte or the end of its input, and
/// kills the group at the end.
pub fn run(args: WatchdogArgs) -> i32 {
    let mut byte = [0u8; 1];
    let read = std::io::stdin().lock().read(&mut byte);
    if matches!(read, Ok(1)) && byte[0] == DISARM {
        return 0;
    }
    if let Some(group) = Pid::from_raw(args.group) {
        // ESRCH: the group has gone already.
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
    }
    0
}
