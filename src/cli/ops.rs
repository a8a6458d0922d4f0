//! `leasehold acquire | release | renew | describe`: one call each, for
//! scripts. Text output is one line of `name=value` pairs (values quoted
//! JSON-style when they contain anything but plain characters); `--json`
//! prints one JSON object instead. Errors are one line on stderr.

use std::io::BufRead;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::connect::{self, ConnectArgs, exit};
use crate::client::Error;

/// Flags of `leasehold acquire`.
#[derive(Debug, Clone, Args)]
pub struct AcquireArgs {
    /// The lock's name.
    pub key: String,
    /// TTL to ask for (e.g. `30s`, more than 0); without it, the server's
    /// default. The lease is NOT kept alive: renew or release it before it
    /// runs out.
    #[arg(long, env = "LEASEHOLD_TTL", allow_hyphen_values = true, value_parser = connect::parse_ttl)]
    pub ttl: Option<Duration>,
    /// How long to wait while another client holds the lock; `0s` (the
    /// default) tries once. Not acquired in time: exit code 75.
    #[arg(long, default_value = "0s", allow_hyphen_values = true, value_parser = connect::parse_duration_not_negative)]
    pub wait: Duration,
    /// Who holds the lock, as `describe` shows it (default: HOST:PID of the
    /// calling process).
    #[arg(long, env = "LEASEHOLD_OWNER")]
    pub owner: Option<String>,
    /// A `KEY=VALUE` pair shown by `describe`; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = connect::parse_kv)]
    pub metadata: Vec<(String, String)>,
    /// Request id: an acquire retried with the same id while its lease
    /// holds the lock prints that same lease again.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Flags of `leasehold release`.
#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    /// The lock's name.
    pub key: String,
    /// The lease's token, or `-` to read it from stdin (keeps it out of
    /// the process list).
    pub token: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Flags of `leasehold renew`.
#[derive(Debug, Clone, Args)]
pub struct RenewArgs {
    /// The lock's name.
    pub key: String,
    /// The lease's token, or `-` to read it from stdin.
    pub token: String,
    /// New TTL (more than 0); without it, the TTL granted.
    #[arg(long, allow_hyphen_values = true, value_parser = connect::parse_ttl)]
    pub ttl: Option<Duration>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Flags of `leasehold describe`.
#[derive(Debug, Clone, Args)]
pub struct DescribeArgs {
    /// The lock's name.
    pub key: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// A value as it appears in text output: bare when it is made of plain
/// characters, JSON-quoted otherwise (spaces, quotes, `=`, empty).
pub(super) fn text(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || "-_./:@+,{}[]#%^~".contains(c));
    if plain {
        value.to_string()
    } else {
        Value::from(value).to_string()
    }
}

/// Prints `fields` as one text line or one JSON object.
pub(super) fn print(json_out: bool, fields: &[(&str, Value)]) {
    if json_out {
        let object: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        println!("{}", Value::Object(object));
    } else {
        let line: Vec<String> = fields
            .iter()
            .flat_map(|(k, v)| match v {
                Value::String(s) => vec![format!("{k}={}", text(s))],
                Value::Object(map) => map
                    .iter()
                    .map(|(mk, mv)| {
                        let mv = mv
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| mv.to_string());
                        format!("{k}.{}={}", text(mk), text(&mv))
                    })
                    .collect(),
                other => vec![format!("{k}={other}")],
            })
            .collect();
        println!("{}", line.join(" "));
    }
}

/// `-` means: read the token from the first line of stdin.
fn token_arg(token: &str) -> Result<String, String> {
    if token != "-" {
        return Ok(token.to_string());
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    let line = line.trim().to_string();
    if line.is_empty() {
        return Err("no token on stdin".into());
    }
    Ok(line)
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `leasehold acquire`: prints the lease, or exits 75 when held by another.
pub async fn acquire(args: AcquireArgs) -> i32 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("acquire", &e),
    };
    let mut builder = client.lock(args.key.clone()).wait(args.wait).owner(
        args.owner
            .clone()
            .unwrap_or_else(|| connect::default_owner(std::os::unix::process::parent_id())),
    );
    if let Some(ttl) = args.ttl {
        builder = builder.ttl(ttl);
    }
    if let Some(id) = &args.request_id {
        builder = builder.request_id(id.clone());
    }
    for (k, v) in &args.metadata {
        builder = builder.metadata(k.clone(), v.clone());
    }
    match builder.lease().await {
        Ok(lease) => {
            print(
                args.json,
                &[
                    ("key", json!(lease.key)),
                    ("acquired", json!(true)),
                    ("token", json!(lease.token)),
                    ("fencing_token", json!(lease.fencing_token)),
                    ("ttl_ms", json!(ms(lease.ttl))),
                ],
            );
            exit::OK
        }
        Err(e @ Error::NotAcquired { .. }) => {
            if let Error::NotAcquired { retry_after, .. } = &e {
                print(
                    args.json,
                    &[
                        ("key", json!(args.key)),
                        ("acquired", json!(false)),
                        ("retry_after_ms", json!(ms(*retry_after))),
                    ],
                );
            }
            connect::fail("acquire", &e)
        }
        Err(e) => connect::fail("acquire", &e),
    }
}

/// `leasehold release`: exit 0 when released, 76 when the token no longer
/// holds the lock.
pub async fn release(args: ReleaseArgs) -> i32 {
    let token = match token_arg(&args.token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leasehold release: {e}");
            return exit::USAGE;
        }
    };
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("release", &e),
    };
    match client.release(args.key.clone(), token).await {
        Ok(released) => {
            print(
                args.json,
                &[("key", json!(args.key)), ("released", json!(released))],
            );
            if released {
                exit::OK
            } else {
                eprintln!(
                    "leasehold release: not released: this token does not hold {:?} (its lease expired, or it never held it: check that you passed the token, not the fencing token)",
                    args.key
                );
                exit::LOST
            }
        }
        Err(e) => connect::fail("release", &e),
    }
}

/// `leasehold renew`: exit 0 when renewed, 76 when the lock is lost.
pub async fn renew(args: RenewArgs) -> i32 {
    let token = match token_arg(&args.token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leasehold renew: {e}");
            return exit::USAGE;
        }
    };
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("renew", &e),
    };
    match client.renew(args.key.clone(), token, args.ttl).await {
        Ok(Some(ttl)) => {
            print(
                args.json,
                &[
                    ("key", json!(args.key)),
                    ("renewed", json!(true)),
                    ("ttl_ms", json!(ms(ttl))),
                ],
            );
            exit::OK
        }
        Ok(None) => {
            print(
                args.json,
                &[("key", json!(args.key)), ("renewed", json!(false))],
            );
            eprintln!(
                "leasehold renew: not renewed: this token does not hold {:?} (its lease expired or was released, or it never held it: check that you passed the token, not the fencing token)",
                args.key
            );
            exit::LOST
        }
        Err(e) => connect::fail("renew", &e),
    }
}

/// `leasehold describe`: who holds the lock; exit 0 whether held or not.
pub async fn describe(args: DescribeArgs) -> i32 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("describe", &e),
    };
    match client.describe(args.key.clone()).await {
        Ok(Some(info)) => {
            let mut metadata: Vec<_> = info.metadata.into_iter().collect();
            metadata.sort();
            let metadata: serde_json::Map<String, Value> = metadata
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            print(
                args.json,
                &[
                    ("key", json!(args.key)),
                    ("held", json!(true)),
                    ("owner", json!(info.owner)),
                    ("fencing_token", json!(info.fencing_token)),
                    ("ttl_ms", json!(ms(info.ttl_remaining))),
                    ("metadata", Value::Object(metadata)),
                ],
            );
            exit::OK
        }
        Ok(None) => {
            print(
                args.json,
                &[("key", json!(args.key)), ("held", json!(false))],
            );
            exit::OK
        }
        Err(e) => connect::fail("describe", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_are_bare_or_quoted() {
        assert_eq!(text("reports/nightly"), "reports/nightly");
        assert_eq!(text("host-1:42"), "host-1:42");
        assert_eq!(text("two words"), "\"two words\"");
        assert_eq!(text(""), "\"\"");
        assert_eq!(text("a=b"), "\"a=b\"");
        assert_eq!(text("q\"x"), "\"q\\\"x\"");
    }
}
