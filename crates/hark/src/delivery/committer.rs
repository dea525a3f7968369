//! Group commit: the single path by which messages become durable.
//!
//! Sends from every connection (and the REST API) are queued here in a bounded channel. The
//! committer takes whatever is waiting, up to `commit_batch`, writes it in one transaction
//! (`Store::append_batch`), then publishes the stored messages on the bus and answers each sender.
//! While one transaction commits the next batch gathers, so the batch grows with the load and the
//! fsync is shared. A full queue sheds new sends with `overloaded` instead of growing.

use std::sync::Arc;
use std::time::Instant;

use hark_protocol::ServerFrame;
use tokio::sync::{mpsc, oneshot};

use super::event::{Audience, Event, MessageEvent, Writer};
use crate::bus::Bus;
use crate::domain::Sender;
use crate::store::{Appended, NewMessage, Store};

/// The outcome of one send, as its sender learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Appended(Appended),
    /// The store failed; nothing was acknowledged. Retry with the same client id.
    Unavailable,
}

struct Job {
    msg: NewMessage,
    reply: oneshot::Sender<Outcome>,
}

/// The queue is full: the node sheds this send. Retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// Cheap handle to the committer task.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts the committer. It runs until every handle is dropped and the queue is empty, so a
    /// drain finishes the sends already accepted.
    pub fn spawn(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        queue: usize,
        max_batch: usize,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(store, bus, rx, max_batch));
        (Committer { tx }, task)
    }

    /// Queues a message. The receiver yields once the message is committed (or refused).
    pub fn submit(&self, msg: NewMessage) -> Result<oneshot::Receiver<Outcome>, Overloaded> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { msg, reply }) {
            Ok(()) => Ok(rx),
            Err(_) => {
                metrics::counter!("hark_sends_shed_total").increment(1);
                Err(Overloaded)
            }
        }
    }

    /// Queues a message and waits for its outcome.
    pub async fn append(&self, msg: NewMessage) -> Result<Outcome, Overloaded> {
        let rx = self.submit(msg)?;
        Ok(rx.await.unwrap_or(Outcome::Unavailable))
    }
}

async fn run(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
    let mut msgs: Vec<NewMessage> = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut jobs, max_batch).await == 0 {
            break;
        }
        metrics::gauge!("hark_commit_queue_depth").set(rx.len() as f64);
        msgs.clear();
        msgs.extend(jobs.iter().map(|j| j.msg.clone()));
        let started = Instant::now();
        let result = store.append_batch(&msgs).await;
        let committed_at = Instant::now();
        metrics::histogram!("hark_store_commit_seconds")
            .record(committed_at.duration_since(started).as_secs_f64());
        metrics::histogram!("hark_store_batch_size").record(msgs.len() as f64);
        match result {
            Ok((outcomes, routes)) => {
                let routes: std::collections::HashMap<_, _> = routes.into_iter().collect();
                let mut stored = 0u64;
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    if let Appended::Stored(m) = &outcome {
                        stored += 1;
                        if let Some(route) = routes.get(&m.conversation_id) {
                            let frame = ServerFrame::Message(m.body()).encode();
                            bus.publish(Event::Message(Arc::new(MessageEvent {
                                audience: Audience {
                                    site_id: route.site_id,
                                    visitor_id: route.visitor_id,
                                },
                                conversation_id: m.conversation_id,
                                seq: m.seq,
                                writer: match &m.sender {
                                    Sender::Visitor(_) => Writer::Visitor,
                                    Sender::Agent { id, .. } => Writer::Agent(*id),
                                    Sender::System => Writer::System,
                                },
                                committed_at,
                                frame: frame.into(),
                            })));
                        }
                    }
                    // The sender may have gone; its message is stored all the same and its
                    // retry will find it.
                    let _ = job.reply.send(Outcome::Appended(outcome));
                }
                metrics::counter!("hark_messages_stored_total").increment(stored);
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = msgs.len(), "commit failed; senders will retry");
                metrics::counter!("hark_commit_failures_total").increment(1);
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Outcome::Unavailable);
                }
            }
        }
    }
    tracing::debug!("committer stopped");
}
