//! The live queue as server-sent events (`GET /api/v1/events`): how a watch's groups become
//! the bytes of the response, and the encodings every console shares.
//!
//! With 100 consoles open, what a change costs the service is multiplied by 100 wherever it
//! is done per console, and most of it is each console's TLS and TCP write, by the byte.
//! So:
//! - a request in the queue is sent as its queue row (`requests`, see [`QueueRow`]), one
//!   that left it as its id and state only (`left`): the detail page fetches the whole
//!   record when it is opened;
//! - a batch every change of which passes a console's filter (always, without filters) is
//!   encoded once and handed to every such console as the same bytes; only a console whose
//!   filter cuts a batch makes its own frames of its part (from changes each encoded once);
//! - the response is written by hand rather than with axum's `Sse`, which would copy every
//!   event's data into a frame of its own.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderValue, header},
    response::Response,
};
use futures_util::{Stream, StreamExt as _};
use gatekeep_proto::model::{RequestRecord, RequestState};
use serde::Serialize;

use super::{
    ops::{WatchGroup, WatchItem},
    queue_row::QueueRow,
};
use crate::hub::Batch;

/// A comment sent when nothing else was for this long, so proxies keep the stream open
/// (axum's `Sse` default).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One item of a `requests` event's data: a request in the queue, as its row.
#[derive(Serialize)]
struct RequestItem<'a> {
    initial: bool,
    row: QueueRow<'a>,
}

/// One item of a `left` event's data: a request that left the queue (decided, expired,
/// withdrawn). The queue needs only which one; its detail is one GET away. This keeps a
/// decision's bytes to every console small: they are what each console's TLS and TCP
/// write cost (issue 21).
#[derive(Serialize)]
struct LeftItem {
    id: uuid::Uuid,
    state: RequestState,
}

/// A change, encoded: the item of the event it belongs in.
#[derive(Clone)]
enum Change {
    /// An item of a `requests` event (the request is pending).
    Queued(Arc<str>),
    /// An item of a `left` event.
    Left(Arc<str>),
}

/// The recent changes and batches, encoded once for every console watching. Entries are
/// keyed by the hub's shared value (`Arc` identity) and keep it alive, so an address is
/// not reused while cached.
#[derive(Default)]
pub(crate) struct Encoder {
    records: Mutex<Changes>,
    batches: Mutex<VecDeque<(Arc<Batch>, Bytes)>>,
}

/// The encoded changes, by the address of the hub's value (a batch of 1,000 changes looks
/// each up: a scan of the cache for each would cost more than the encoding), and in the
/// order cached, oldest first, holding the values so their addresses stay theirs.
#[derive(Default)]
struct Changes {
    by_address: HashMap<usize, Change>,
    order: VecDeque<Arc<RequestRecord>>,
}

impl Encoder {
    /// Changes kept: a batch holds at most [`crate::hub::BATCH_MAX`]; consoles read a batch
    /// within moments of each other.
    const RECORDS_KEPT: usize = 2048;
    const BATCHES_KEPT: usize = 8;

    /// A change as an item of the event it belongs in.
    fn change(&self, record: &Arc<RequestRecord>) -> Result<Change, serde_json::Error> {
        let address = Arc::as_ptr(record).addr();
        let mut cache = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(change) = cache.by_address.get(&address) {
            return Ok(change.clone());
        }
        let change = if record.state == RequestState::Pending {
            Change::Queued(
                serde_json::to_string(&RequestItem {
                    initial: false,
                    row: QueueRow::of(record),
                })?
                .into(),
            )
        } else {
            Change::Left(
                serde_json::to_string(&LeftItem {
                    id: record.request.id,
                    state: record.state,
                })?
                .into(),
            )
        };
        if cache.order.len() >= Self::RECORDS_KEPT
            && let Some(oldest) = cache.order.pop_front()
        {
            cache.by_address.remove(&Arc::as_ptr(&oldest).addr());
        }
        cache.order.push_back(Arc::clone(record));
        cache.by_address.insert(address, change.clone());
        Ok(change)
    }

    /// The frames of a whole batch, made by the first console to send it and shared by the
    /// others (the lock is held while they are made, so they are made once).
    fn batch(&self, batch: &Arc<Batch>) -> Bytes {
        let mut cache = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, frame)) = cache
            .iter()
            .rev()
            .find(|(cached, _)| Arc::ptr_eq(cached, batch))
        {
            return frame.clone();
        }
        let Batch::Changes(changes) = &**batch else {
            // Not a batch of changes: nothing to share (watches turn these into `end`).
            return Bytes::new();
        };
        let frame = match self.changes(changes.iter().map(|record| (false, record))) {
            Ok(frame) => frame,
            Err(error) => return internal(&error),
        };
        if cache.len() >= Self::BATCHES_KEPT {
            cache.pop_front();
        }
        cache.push_back((Arc::clone(batch), frame.clone()));
        frame
    }

    /// The frames of some requests: those in the queue as one `requests` event (a JSON
    /// array), then those that left it as one `left` event. A batch holds a request once,
    /// so the two need no order between them.
    fn changes<'a>(
        &self,
        items: impl Iterator<Item = (bool, &'a Arc<RequestRecord>)>,
    ) -> Result<Bytes, serde_json::Error> {
        let mut queued = String::from("[");
        let mut left = String::from("[");
        for (initial, record) in items {
            let (list, item) = if initial {
                // A snapshot is this console's own: not worth keeping.
                let item = serde_json::to_string(&RequestItem {
                    initial,
                    row: QueueRow::of(record),
                })?;
                (&mut queued, Arc::from(item))
            } else {
                match self.change(record)? {
                    Change::Queued(item) => (&mut queued, item),
                    Change::Left(item) => (&mut left, item),
                }
            };
            if list.len() > 1 {
                list.push(',');
            }
            list.push_str(&item);
        }
        let mut frames = String::new();
        for (event, mut list) in [("requests", queued), ("left", left)] {
            if list.len() > 1 {
                list.push(']');
                push_frame(&mut frames, event, &list);
            }
        }
        Ok(Bytes::from(frames))
    }

    /// The frames of one group of a watch: its requests (see [`Self::changes`]), then
    /// `ready` or `end` if the group holds one.
    fn frames(&self, group: WatchGroup) -> Vec<Bytes> {
        let items = match group {
            WatchGroup::Batch(batch) => return vec![self.batch(&batch)],
            WatchGroup::Items(items) => items,
        };
        let mut frames = Vec::new();
        let mut requests: Vec<(bool, &Arc<RequestRecord>)> = Vec::new();
        let flush = |requests: &mut Vec<(bool, &Arc<RequestRecord>)>, frames: &mut Vec<Bytes>| {
            if !requests.is_empty() {
                frames.push(
                    self.changes(requests.drain(..))
                        .unwrap_or_else(|error| internal(&error)),
                );
            }
        };
        for item in &items {
            let end = match item {
                WatchItem::Request { initial, record } => {
                    requests.push((*initial, record));
                    continue;
                }
                WatchItem::Ready => frame("ready", "{}"),
                WatchItem::Lagged { missed } => frame(
                    "end",
                    &format!("the watch fell {missed} changes behind; watch again"),
                ),
                WatchItem::ShuttingDown => frame("end", "the decision service is shutting down"),
                WatchItem::Expired => frame("end", "the session expired; sign in again"),
            };
            flush(&mut requests, &mut frames);
            frames.push(end);
        }
        flush(&mut requests, &mut frames);
        frames
    }
}

/// One event. `data` must be a single line (JSON from serde has none; messages are ours).
fn frame(event: &str, data: &str) -> Bytes {
    let mut text = String::new();
    push_frame(&mut text, event, data);
    Bytes::from(text)
}

fn push_frame(text: &mut String, event: &str, data: &str) {
    debug_assert!(!data.contains(['\n', '\r']), "one data line");
    for part in ["event: ", event, "\ndata: ", data, "\n\n"] {
        text.push_str(part);
    }
}

fn internal(error: &serde_json::Error) -> Bytes {
    tracing::error!(%error, "cannot encode a watch event");
    frame("end", "internal error in the decision service; see its log")
}

/// The response of a watch: its groups as events, a keep-alive comment after
/// [`KEEP_ALIVE`] (to twice that) of silence. The console's connection polls it itself (no task per watch).
pub(crate) fn response(
    encoder: Arc<Encoder>,
    groups: impl Stream<Item = WatchGroup> + Send + 'static,
) -> Response {
    let frames = groups
        .flat_map(move |group| futures_util::stream::iter(encoder.frames(group)))
        .filter(|frame| std::future::ready(!frame.is_empty()));
    // A tick every KEEP_ALIVE sends a comment if nothing went out since the last one: no
    // timer to reset for every frame (a cost per console per batch).
    let ticks = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    let body = futures_util::stream::unfold(
        (Box::pin(frames), ticks, false),
        |(mut frames, mut ticks, mut sent)| async move {
            loop {
                tokio::select! {
                    biased;
                    frame = frames.next() => {
                        return Some((Ok::<_, Infallible>(frame?), (frames, ticks, true)));
                    }
                    _ = ticks.tick() => {
                        if !std::mem::take(&mut sent) {
                            let comment = Bytes::from_static(b":\n\n");
                            return Some((Ok(comment), (frames, ticks, false)));
                        }
                    }
                }
            }
        },
    );
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_server_sent_events() {
        assert_eq!(
            &frame("ready", "{}")[..],
            b"event: ready\ndata: {}\n\n".as_slice()
        );
    }
}
