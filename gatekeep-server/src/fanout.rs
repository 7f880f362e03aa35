//! Replicas on one database: what another replica changed reaches this one's agents and
//! watchers.
//!
//! The store announces every committed change of the others ([`Store::changes`]); for each,
//! this replica re-reads the request (or grant) and, as if it had made the change itself,
//! tells the watchers, hands a final decision to the agent's stream if that agent is
//! connected here, and wakes its deadline timer for a new pending request. A store only one
//! process uses announces nothing, and this never runs.
//!
//! [`Store::changes`]: crate::store::Store::changes

use std::sync::Arc;

use gatekeep_proto::{model::RequestState, v1};
use tokio::sync::mpsc;

use crate::{lifecycle::Engine, store::Change};

/// Follows `changes` until shutdown.
pub(crate) async fn follow(engine: Arc<Engine>, mut changes: mpsc::UnboundedReceiver<Change>) {
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            () = engine.shutdown.cancelled() => return,
        };
        let Some(change) = change else {
            return;
        };
        if let Err(error) = apply(&engine, &change).await {
            tracing::warn!(%error, ?change, "failed to apply another replica's change");
        }
    }
}

async fn apply(engine: &Engine, change: &Change) -> Result<(), crate::store::StoreError> {
    match change {
        Change::Request { id, host, pending } => {
            if *pending {
                engine.wake_timer();
            }
            // Nothing to do here unless someone watches, or a final decision goes to an
            // agent connected here: most changes (automatic decisions, other replicas'
            // agents) need no read at all.
            let deliver = !*pending && engine.hub.is_connected(host);
            if !deliver && !engine.hub.watched() {
                return Ok(());
            }
            let Some(stored) = engine.store.get_request(*id).await? else {
                return Ok(());
            };
            let record = stored.value;
            match (&record.decision, record.state) {
                // The agent withdrew it: it needs no answer.
                (_, RequestState::Pending | RequestState::Abandoned) | (None, _) => {}
                (Some(decision), _) if deliver => {
                    engine.hub.send(
                        &record.host,
                        v1::server_message::Message::Decision(decision.clone().into()),
                    );
                }
                (Some(_), _) => {}
            }
            engine.hub.publish(&record);
        }
        Change::GrantRevoked { id, host } => {
            // Notification feeds announce revocations made anywhere.
            let notify = engine.hub.revocations_watched();
            if !engine.hub.is_connected(host) && !notify {
                return Ok(());
            }
            let Some(grant) = engine.store.get_grant(*id).await? else {
                return Ok(());
            };
            if notify {
                engine.hub.publish_revoked(&grant);
            }
            if let Some(revoked) = &grant.revoked {
                engine.hub.send(
                    &grant.host,
                    v1::server_message::Message::GrantRevoked(v1::GrantRevoked {
                        grant_id: grant.id.to_string(),
                        revoked_by: revoked.by.clone(),
                        reason: revoked.reason.clone(),
                    }),
                );
            }
        }
        Change::Resync => {
            // Decisions announced while the notifications were down reach their agents when
            // the agents re-send their pending requests (they do on every reconnect); the
            // timer re-reads every deadline.
            tracing::info!("database notifications resumed; some changes may have been missed");
            engine.wake_timer();
        }
    }
    Ok(())
}
