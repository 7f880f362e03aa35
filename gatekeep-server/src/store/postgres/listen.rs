//! Following the other replicas: a dedicated connection `LISTEN`s to `gatekeep_changes`
//! (announced by the schema's triggers at every commit) and forwards what other replicas
//! changed.
//!
//! A notification sent while this connection was down is lost, so after a reconnect the
//! receiver gets [`Change::Resync`]: the fan-out then re-reads what it serves.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use super::{Target, tls::Dialer};
use crate::store::Change;

/// The notification channel the triggers announce on.
const CHANNEL: &str = "gatekeep_changes";
/// Longest wait between reconnection attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Starts following; the task ends when the receiver is dropped.
pub(super) fn spawn(
    dialer: Dialer,
    target: Target,
    origin: String,
) -> mpsc::UnboundedReceiver<Change> {
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut retry = Duration::from_millis(100);
        let mut first = true;
        while !sender.is_closed() {
            match follow(&dialer, &origin, &sender, first).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(
                        target = %target,
                        %error,
                        "lost the database's change notifications; reconnecting \
                         (decisions made on other replicas wait until then)"
                    );
                }
            }
            first = false;
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    });
    receiver
}

/// One connection's life: `Ok` once the receiver is gone, `Err` when the connection failed.
async fn follow(
    dialer: &Dialer,
    origin: &str,
    sender: &mpsc::UnboundedSender<Change>,
    first: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (client, mut connection) = dialer.connect().await?;
    let (forward, mut forwarded) = mpsc::unbounded_channel();
    // The connection delivers notifications only while it is polled as a stream.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if forward.send(Ok(note)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    drop(forward.send(Err(error)));
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    if !first && sender.send(Change::Resync).is_err() {
        return Ok(());
    }
    let result = loop {
        let received = tokio::select! {
            received = forwarded.recv() => received,
            // The replica stopped following (shutdown): end, and close the connection.
            () = sender.closed() => break Ok(()),
        };
        let note = match received {
            Some(Ok(note)) => note,
            Some(Err(error)) => break Err(error.into()),
            None => break Err("the database closed the connection".into()),
        };
        let Some(change) = parse(note.payload(), origin) else {
            continue;
        };
        if sender.send(change).is_err() {
            break Ok(());
        }
    };
    driver.abort();
    result
}

/// `r|<request id>|<state>|<writer>|<host>` or `g|<grant id>||<writer>|<host>` (the host
/// last: it is the one field gatekeep does not write itself); `None` for this replica's own
/// changes (and anything malformed, which no gatekeep trigger sends).
fn parse(payload: &str, origin: &str) -> Option<Change> {
    let mut parts = payload.splitn(5, '|');
    let (kind, id, state, writer, host) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if writer == origin {
        return None;
    }
    let id = Uuid::try_parse(id).ok()?;
    match kind {
        "r" => Some(Change::Request {
            id,
            host: host.to_owned(),
            pending: state == "pending",
        }),
        "g" => Some(Change::GrantRevoked {
            id,
            host: host.to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_and_malformed_notifications_are_skipped() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse(&format!("r|{id}|pending|gatekeep-b|web-1"), "gatekeep-a"),
            Some(Change::Request {
                id,
                host: "web-1".into(),
                pending: true
            })
        );
        assert_eq!(
            parse(&format!("r|{id}|approved|gatekeep-b|a|b"), "gatekeep-a"),
            Some(Change::Request {
                id,
                host: "a|b".into(),
                pending: false
            })
        );
        assert_eq!(
            parse(&format!("g|{id}||gatekeep-b|web-1"), "gatekeep-a"),
            Some(Change::GrantRevoked {
                id,
                host: "web-1".into()
            })
        );
        assert_eq!(
            parse(&format!("r|{id}|pending|gatekeep-a|web-1"), "gatekeep-a"),
            None
        );
        assert_eq!(
            parse("r|not-an-id|pending|gatekeep-b|web-1", "gatekeep-a"),
            None
        );
        assert_eq!(
            parse(&format!("x|{id}|pending|gatekeep-b|web-1"), "gatekeep-a"),
            None
        );
        assert_eq!(
            parse(&format!("r|{id}|pending|gatekeep-b"), "gatekeep-a"),
            None
        );
    }
}
