//! A connection's bounded outbound queue: the hub pushes without waiting, the connection task
//! pops. Unlike a tokio channel, it allocates nothing until an event arrives, which matters when a
//! node holds tens of thousands of idle visitor connections.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::event::Event;

struct Inner {
    /// Held only to push or pop one item (no `.await` inside), so a std mutex fits.
    queue: Mutex<VecDeque<Event>>,
    capacity: usize,
    notify: Notify,
    closed: AtomicBool,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` events: the connection is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

/// The pushing side (held by the hub); clone freely.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// The popping side (held by the connection task).
pub struct Inbox {
    inner: Arc<Inner>,
}

pub fn outbox(capacity: usize) -> (Outbox, Inbox) {
    let inner = Arc::new(Inner {
        queue: Mutex::new(VecDeque::new()),
        capacity: capacity.max(1),
        notify: Notify::new(),
        closed: AtomicBool::new(false),
    });
    (
        Outbox {
            inner: inner.clone(),
        },
        Inbox { inner },
    )
}

fn lock(m: &Mutex<VecDeque<Event>>) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox {
    pub fn try_push(&self, event: Event) -> Result<(), PushError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        {
            let mut q = lock(&self.inner.queue);
            if q.len() >= self.inner.capacity {
                return Err(PushError::Full);
            }
            q.push_back(event);
        }
        // Stores a permit if the connection is not waiting yet, so no wake-up is lost.
        self.inner.notify.notify_one();
        Ok(())
    }
}

impl Inbox {
    pub fn try_pop(&mut self) -> Option<Event> {
        lock(&self.inner.queue).pop_front()
    }

    /// The next event. Cancel-safe: an event is only taken by the call that returns it.
    pub async fn pop(&mut self) -> Event {
        loop {
            if let Some(e) = self.try_pop() {
                return e;
            }
            self.inner.notify.notified().await;
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        lock(&self.inner.queue).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::event::{Audience, ConversationChange};
    use crate::domain::{ConversationId, SiteId, VisitorId};

    fn ev(seq: u64) -> Event {
        Event::Conversation(Arc::new(ConversationChange {
            audience: Audience {
                site_id: SiteId::new(),
                visitor_id: VisitorId::new(),
            },
            kind: hark_protocol::ConversationEvent::Opened,
            conversation_id: ConversationId::new(),
            last_seq: seq,
            open: true,
            assignee: None,
            frame: "{}".into(),
        }))
    }

    fn seq(e: &Event) -> u64 {
        match e {
            Event::Conversation(c) => c.last_seq,
            Event::Message(m) => m.seq,
            _ => 0,
        }
    }

    #[tokio::test]
    async fn bounded_fifo_that_wakes_its_reader() {
        let (tx, mut rx) = outbox(2);
        assert_eq!(tx.try_push(ev(1)), Ok(()));
        assert_eq!(tx.try_push(ev(2)), Ok(()));
        assert_eq!(tx.try_push(ev(3)), Err(PushError::Full));
        assert_eq!(seq(&rx.pop().await), 1);
        assert_eq!(seq(&rx.try_pop().expect("second")), 2);
        assert!(rx.try_pop().is_none());
        let waiter = tokio::spawn(async move { seq(&rx.pop().await) });
        tokio::task::yield_now().await;
        assert_eq!(tx.try_push(ev(4)), Ok(()));
        assert_eq!(waiter.await.expect("reader"), 4);
        // The reader is gone: pushes report it.
        assert_eq!(tx.try_push(ev(5)), Err(PushError::Closed));
    }
}
