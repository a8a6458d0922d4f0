//! The keeper driven by hand, without a server.

use super::*;
use crate::client::transport::Settings;

fn attach(keeper: &mut Keeper, token: &str) -> watch::Receiver<LockState> {
    let now = BootInstant::now();
    let (state, rx) = watch::channel(LockState::Lost(LostReason::ClientClosed));
    keeper.command(Command::Attach {
        key: "k".into(),
        token: token.into(),
        fencing_token: 1,
        ttl: Duration::from_secs(5),
        deadline: Some(now + Duration::from_secs(5)),
        gone_by: now + Duration::from_secs(5),
        state,
    });
    rx
}

#[tokio::test]
async fn attach_cancels_an_unsent_release_of_the_same_lease_only() {
    let transport =
        Arc::new(Transport::new(vec!["http://127.0.0.1:1".into()], Settings::default()).unwrap());
    let (_commands, rx) = mpsc::unbounded_channel();
    let mut keeper = Keeper::new(transport, rx);
    // A guard dropped while no stream is up: its release waits.
    keeper.command(Command::Release {
        key: "k".into(),
        token: "t1".into(),
        ttl: Duration::from_secs(5),
    });
    assert_eq!(keeper.releasing.len(), 1);
    // The same lease attached again (a request id replay): the queued
    // release would undo it, so it goes.
    let state = attach(&mut keeper, "t1");
    assert!(keeper.releasing.is_empty());
    assert!(matches!(
        *state.borrow(),
        LockState::Attaching {
            deadline: Some(_),
            ..
        }
    ));
    // A release of another lease of the same key stays.
    keeper.command(Command::Release {
        key: "k".into(),
        token: "t0".into(),
        ttl: Duration::from_secs(5),
    });
    let _ = attach(&mut keeper, "t1");
    assert_eq!(keeper.releasing.len(), 1);
}

#[test]
fn belief_ends_a_little_before_the_deadline() {
    let now = BootInstant::now();
    let deadline = now + Duration::from_secs(10);
    assert_eq!(
        believed_until(deadline, Duration::from_secs(10)),
        now + Duration::from_millis(9950)
    );
    // Short TTLs keep nine tenths of it.
    assert_eq!(
        believed_until(deadline, Duration::from_millis(200)),
        now + Duration::from_millis(9980)
    );
}
